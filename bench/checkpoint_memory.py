"""
Memory of a checkpoint save under FSDP2: the main process's peak RSS while it writes a sharded
checkpoint (each process its own part, sharded_checkpoint.py) against the whole-state gather
(distributed.full_state + one ckpt.pt, what FSDP2 runs did before). CPU processes over gloo,
started by torchrun, one run per kind so that their peaks do not mix.

    python bench/checkpoint_memory.py               # 300M's width, 6 layers: 92M; 2 processes
    python bench/checkpoint_memory.py --layers=22 --processes=4

Each process builds the model, takes one AdamW step (so the optimizer state exists), resets its
RSS high-water mark (/proc/self/clear_refs, Linux), saves, and reads the mark back (VmHWM). Prints,
per kind, the main process's RSS before the save, its peak during the save and the time taken.
The weights and AdamW's two moments are 12 bytes per parameter: the gather adds that much to the
main process, the sharded save about nothing.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python bench/NAME.py`: import the repository's modules, not bench/'s
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from infra import distributed
from infra import sharded_checkpoint
from infra.checkpoint import save_checkpoint
from configs import MODEL_SIZES
from model import ModelArgs, Transformer
from train import configure_optimizer


def memory_mib(field):
    """VmRSS (now) or VmHWM (the high-water mark) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status: this benchmark needs Linux")


def reset_peak():
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def worker(kind, layers, out_dir):
    """One process of a torchrun job: one training step, then one save of `kind`; the main process
    prints its figures as a JSON line."""
    env = distributed.setup("cpu", "fsdp")
    torch.manual_seed(0)
    args = ModelArgs(**{**MODEL_SIZES["300M"], "n_layers": layers})
    raw_model = Transformer(args)
    model = distributed.wrap_model(raw_model, env)
    optimizer = configure_optimizer(raw_model, 1e-4)
    tokens = torch.randint(0, args.vocab_size, (1, 16))
    model(tokens, tokens)[1].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    meta = dict(step=1, data_position=1, model_args=asdict(args), config={})
    distributed.barrier(env)
    reset_peak()
    before, t0 = memory_mib("VmRSS"), time.time()
    if kind == "sharded":
        sharded_checkpoint.save(out_dir, raw_model, optimizer, meta, env)
    else:  # today's whole checkpoint: every tensor gathered onto the main process, one writer
        model_state, optim_state = distributed.full_state(raw_model, optimizer, env)
        rng = distributed.rng_states(env)  # every process takes part
        if env.is_main:
            save_checkpoint(Path(out_dir) / "ckpt.pt",
                            dict(model=model_state, optimizer=optim_state, rng=rng, **meta))
        del model_state, optim_state
    distributed.barrier(env)
    if env.is_main:
        print(json.dumps(dict(kind=kind, params=raw_model.num_params(), before=before,
                              peak=memory_mib("VmHWM"), seconds=time.time() - t0)))
    distributed.cleanup()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6, help="transformer blocks of 300M's width")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out_dir", default="", help="where the checkpoints go (default: a "
                                                      "temporary directory)")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)  # sharded | gather
    a = parser.parse_args(argv)
    if a.worker:
        return worker(a.worker, a.layers, a.out_dir)
    lines = []
    for kind in ("sharded", "gather"):
        with tempfile.TemporaryDirectory(dir=a.out_dir or None) as out_dir:
            result = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={a.processes}", __file__, f"--worker={kind}",
                 f"--layers={a.layers}", f"--out_dir={out_dir}"],
                env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                timeout=1800)
            if result.returncode != 0:
                sys.exit(f"the {kind} run failed:\n{result.stderr[-3000:]}")
            r = json.loads(result.stdout.strip().splitlines()[-1])
        lines.append(f"{kind:>7}: main process {r['before']:,.0f} MiB before the save, peak "
                     f"{r['peak']:,.0f} MiB during it (+{r['peak'] - r['before']:,.0f}), "
                     f"{r['seconds']:.1f} s")
    print(f"{r['params'] / 1e6:.0f}M parameters (state {12 * r['params'] / 2**20:,.0f} MiB: "
          f"weights + AdamW moments, float32), {a.processes} processes, CPU/gloo")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
