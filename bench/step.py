"""
Training-step throughput of our decoder vs transformers' LlamaForCausalLM: same config, same weights, same batch,
same process, steps interleaved so both see the same machine load.

    python bench/step.py                          # CPU, a small model, eager
    python bench/step.py --compile                # also torch.compile (ours and theirs)
    python bench/step.py --device cuda --size 300M --batch_size 8 --seq_len 4096 --dtype bfloat16
    python bench/step.py --device cuda --size 300M --batch_size 8 --seq_len 1024 --dtype bfloat16 --compile --profile

A step is forward + loss + backward + AdamW update. Prints tokens/s of each and the ratio ours / transformers.
On CUDA it also prints MFU (FLOPs per token = 3 x forward FLOPs, peak bf16 by device name). --profile then runs
three more steps of our (compiled, if asked) model under torch.profiler and prints where the time went, the
kernels with the most device time (CPU time on a CPU): where to look before changing anything.
"""
import argparse
import sys
from pathlib import Path
import tempfile
import time

import torch

if __package__ in (None, ""):  # run as `python bench/NAME.py`: import the repository's modules, not bench/'s
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from configs import MODEL_SIZES
from infra.distributed import peak_flops
from infra.checkpoint import save_hf
from model import ModelArgs, Transformer, estimate_flops
from train import configure_optimizer


def train_step(model, optimizer, idx, targets, autocast_dtype, is_ours):
    with torch.autocast(idx.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        if is_ours:
            loss = model(idx, targets)[1]
        else:
            loss = model(input_ids=idx, labels=targets).loss  # HF shifts labels itself
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default=None, choices=sorted(MODEL_SIZES), help="a config; default: a small CPU model")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (after warm-up)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast dtype")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile")
    p.add_argument("--profile", action="store_true", help="print the top kernels of three of our steps")
    opt = p.parse_args()
    import transformers

    cfg = MODEL_SIZES[opt.size] if opt.size else dict(dim=256, n_layers=4, n_heads=4, hidden_dim=688,
                                                       vocab_size=8192, max_seq_len=1024)
    args = ModelArgs(**{**cfg, "max_seq_len": max(cfg.get("max_seq_len", 0), opt.seq_len)})
    torch.manual_seed(0)
    ours = Transformer(args).to(opt.device)
    with tempfile.TemporaryDirectory() as tmp:  # identical weights, through our own exporter
        save_hf(ours, tmp)
        theirs = transformers.LlamaForCausalLM.from_pretrained(tmp, attn_implementation="sdpa").to(opt.device)
    theirs.train()
    autocast_dtype = torch.bfloat16 if opt.dtype == "bfloat16" else None
    idx = torch.randint(0, args.vocab_size, (opt.batch_size, opt.seq_len + 1), device=opt.device)
    x, y = idx[:, :-1], idx[:, 1:]
    contenders = {"ours": (ours, x, y, True), "transformers": (theirs, x, x, False)}  # HF shifts its labels
    if opt.compile:
        contenders["ours+compile"] = (torch.compile(ours), x, y, True)
        contenders["transformers+compile"] = (torch.compile(theirs), x, x, False)
    optimizers = {name: configure_optimizer(m, 1e-4, device_type=opt.device) for name, (m, *_) in
                  contenders.items()}
    sync = torch.cuda.synchronize if opt.device == "cuda" else (lambda: None)
    for name, (model, a, b, is_ours) in contenders.items():  # warm-up (and compilation)
        for _ in range(opt.warmup):
            train_step(model, optimizers[name], a, b, autocast_dtype, is_ours)
    seconds = {name: 0.0 for name in contenders}
    for _ in range(opt.steps):  # interleave so a busy machine slows everyone alike
        for name, (model, a, b, is_ours) in contenders.items():
            sync()
            t0 = time.perf_counter()
            train_step(model, optimizers[name], a, b, autocast_dtype, is_ours)
            sync()
            seconds[name] += time.perf_counter() - t0
    tokens = opt.batch_size * opt.seq_len * opt.steps
    device_name = torch.cuda.get_device_name() if opt.device == "cuda" else "cpu"
    peak = peak_flops(device_name)
    flops_per_token = 3 * estimate_flops(args, opt.seq_len) / opt.seq_len
    print(f"device {device_name}, threads {torch.get_num_threads()}, dim {args.dim} x {args.n_layers} layers, "
          f"vocab {args.vocab_size}, batch {opt.batch_size} x {opt.seq_len} tokens, autocast {opt.dtype}")
    for name in contenders:
        tps = tokens / seconds[name]
        mfu = f", MFU {100 * tps * flops_per_token / peak:.1f}%" if peak else ""
        print(f"{name:>22}: {tps:10.0f} tokens/s{mfu}")
    print(f"ratio ours / transformers (eager): {seconds['transformers'] / seconds['ours']:.2f}x")
    if opt.compile:
        print(f"ratio ours+compile / transformers+compile: "
              f"{seconds['transformers+compile'] / seconds['ours+compile']:.2f}x")
        print(f"ratio ours+compile / ours (eager): {seconds['ours'] / seconds['ours+compile']:.2f}x")
    if opt.profile:
        name = "ours+compile" if opt.compile else "ours"
        model, a, b, _ = contenders[name]
        activities = [torch.profiler.ProfilerActivity.CPU]
        if opt.device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(3):
                train_step(model, optimizers[name], a, b, autocast_dtype, True)
            sync()
        key = "self_cuda_time_total" if opt.device == "cuda" else "self_cpu_time_total"
        print(f"\n{name}, 3 steps under the profiler, by {key}:")
        print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
