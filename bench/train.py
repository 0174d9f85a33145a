"""
Training speed: tokens/s and MFU of the training loop (train.py) (bf16 autocast + torch.compile on a GPU) on random tokens,
so no data is needed, at the paper's two context lengths: 256 (stage 1, single images) and 4096 (stage 2).

    python bench/train.py --size=300M                          # one GPU: 256 and 4096 tokens
    python bench/train.py --size=300M --seq_lens=256 --micro_batch_sizes=128 --steps=40
    PJRT_DEVICE=TPU python bench/train.py --size=1B --device=xla
    python bench/train.py --size=tiny --device=cpu --seq_lens=64 --micro_batch_sizes=8 --steps=6 --warmup=2

Prints one line per context length: the median over the steps after the warm-up (which pays for compilation).
MFU divides by the device's peak bf16 FLOP/s (distributed.PEAK_FLOPS); it is n/a on a CPU.
"""
import argparse
import sys
from pathlib import Path
import statistics
import tempfile

import numpy as np

if __package__ in (None, ""):  # run as `python bench/NAME.py`: import the repository's modules, not bench/'s
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import train
from configs import MODEL_SIZES
from infra.settings import parse_config


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="300M", choices=sorted(MODEL_SIZES))
    parser.add_argument("--seq_lens", default="256,4096", help="context lengths to measure, comma-separated")
    parser.add_argument("--micro_batch_sizes", default="64,4", help="sequences per device per step, one per length")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the median")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--compile", default="true")
    parser.add_argument("--out_dir", default="", help="where the runs write (default: a temporary directory)")
    a = parser.parse_args(argv)
    vocab = MODEL_SIZES[a.size]["vocab_size"]
    lines = []
    for seq_len, micro in zip(map(int, a.seq_lens.split(",")), map(int, a.micro_batch_sizes.split(","))):
        with tempfile.TemporaryDirectory(dir=a.out_dir or None) as out_dir:  # each run ends with a checkpoint
            c = parse_config([
                f"--size={a.size}", f"--tokens_per_image={seq_len}", "--images_per_seq=1",
                f"--micro_batch_size={micro}", f"--batch_size={micro}", f"--max_steps={a.steps}",
                "--warmup_steps=1", "--log_interval=1", f"--eval_interval={a.steps}", "--eval_iters=1",
                "--num_samples=0", "--export_hf=false", f"--device={a.device}", f"--dtype={a.dtype}",
                f"--compile={a.compile}", f"--out_dir={out_dir}"], train.SETTINGS)

            def random_tokens(first, count):
                return np.random.default_rng(first).integers(0, vocab, (count, seq_len))

            metrics = train.train(c, random_tokens, random_tokens)[a.warmup:]
        tokens_per_s = statistics.median(m["tokens_per_s"] for m in metrics)
        mfu = [m["mfu"] for m in metrics if m["mfu"] is not None]
        mfu = f"{100 * statistics.median(mfu):.1f}%" if mfu else "n/a"
        lines.append(f"{a.size} at {seq_len} tokens, micro-batch {micro}: {tokens_per_s:,.0f} tokens/s, "
                     f"MFU {mfu}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
