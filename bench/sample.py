"""
Sampling speed: our `generate` (static KV cache, sample.py) against transformers' `generate` on the same weights
(written with checkpoint.save_hf, read back with LlamaForCausalLM.from_pretrained), same prompt, same length, one process.

    OMP_NUM_THREADS=2 python bench/sample.py --compile        # CPU: random dim-256 x 6 model, 8192-code vocabulary
    OMP_NUM_THREADS=2 python bench/sample.py --size tiny --prompt_len 128 --new 128 --compile   # the toy's model
    OMP_NUM_THREADS=1 python bench/sample.py --dim 64 --n_layers 2 --vocab_size 512 --compile   # per-token overhead
    python bench/sample.py --device cuda --size 300M --batch 1 32 --compile --skip_hf

At batch 1 on a CPU the default model's decode step is 43 matrix-vector products over 27 MB of float32 weights
(which both implementations must do) plus about 180 small operations whose cost is mostly PyTorch's per-call
dispatch; the smaller models show each loop's per-token overhead. Wall times on a shared machine vary with the load:
the runs take turns, the median is the figure, the slowest-fastest range the spread, and the process CPU time
printed beside them is steadier still.

Every decode step reads all parameters once, so a batch of B cannot beat a floor set by memory. On GPU it prints
that bound, B * HBM bandwidth / parameter bytes tokens/s (plus the key/value cache it reads, shown beside it). On
a CPU it times the floor: the step's matrix products alone, every weight read once in the same order and nothing
else, as the BLAS calls an eager loop makes (transformers' time per token over it is the most an eager loop could
gain) and, with --compile, as the compiled step computes them (a fused multiply-and-sum: fast_decode.MatVecLinear).
--profile runs one more generate call (the compiled one when asked) under torch.profiler and prints where the
time went: on GPU, whether kernels or launches fill the step.
"""
import argparse
import ast
import contextlib
import sys
from pathlib import Path
import os
import statistics
import tempfile
import time

import torch
import torch._inductor.config  # noqa: F401 (--inductor sets it)

if __package__ in (None, ""):  # run as `python bench/NAME.py`: import the repository's modules, not bench/'s
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from configs import MODEL_SIZES
from infra import fast_decode
from infra.checkpoint import save_hf
from model import ModelArgs, Transformer
from sample import generate

# the CPU comparison model: small enough for a shared CPU, the real 8192-code vocabulary
TINY = dict(dim=256, n_layers=6, n_heads=4, vocab_size=8192, max_seq_len=1024)
HBM_TBPS = {"H200": 4.8, "H100 NVL": 3.9, "H100 PCIe": 2.0, "H100": 3.35, "A100-SXM4-80GB": 2.04, "A100": 1.56,
            "L40S": 0.86, "L4": 0.3, "A10G": 0.6, "V100": 0.9, "RTX 4090": 1.0}  # vendor peak figures, TB/s


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(runners, device, repeats):
    """Time each runner `repeats` times, taking turns so that load from other work on a shared machine hits all of
    them alike. Per runner: the wall times of its runs (round by round), its least process CPU time (on a CPU
    shared with other jobs the cleanest measure of the work done), its last output."""
    times, cpu, outputs = {label: [] for label in runners}, {label: [] for label in runners}, {}
    for _ in range(repeats):
        for label, fn in runners.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            outputs[label] = fn()
            sync(device)
            times[label].append(time.perf_counter() - t0)
            cpu[label].append(time.process_time() - c0)
    return {label: (t, min(cpu[label]), outputs[label]) for label, t in times.items()}


def matvec_floor(model, batch, device, compile=False, repeats=200):
    """Seconds per decode step for its matrix products alone: one [B, 1, d] input through every Linear of the
    model (not the embedding table: one row of it is read per token), in the model's order. Eager: the BLAS
    calls both eager loops make; compiled: as the compiled decode step computes them."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {m.in_features: torch.randn(batch, 1, m.in_features, dtype=m.weight.dtype, device=device)
              for m in linears}
    products = lambda: [m(inputs[m.in_features]) for m in linears]
    if compile:
        products = torch.compile(products)
    # compiled on a CPU: the Linears as the compiled step runs them (fast_decode.MatVecLinear)
    fused = fast_decode.matvec_linears(model) if compile and device.type == "cpu" else contextlib.nullcontext()
    with torch.inference_mode(), fused:
        for i in range(repeats + 20):  # 20 warm-up rounds
            if i == 20:
                sync(device)
                t0 = time.perf_counter()
            products()
        sync(device)
    return (time.perf_counter() - t0) / repeats


def hbm_bandwidth(device, override):
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tb * 1e12 for key, tb in HBM_TBPS.items() if key in name), None)


def main(argv=None):
    p = argparse.ArgumentParser(description="Tokens/s of our KV-cached generate vs transformers' generate.")
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default=None, choices=sorted(MODEL_SIZES), help="a configs size (default: a tiny "
                   "dim-256, 6-layer, 8192-vocab model)")
    p.add_argument("--dim", type=int, default=None, help="tiny model's width (default 256)")
    p.add_argument("--n_layers", type=int, default=None, help="tiny model's depth (default 6)")
    p.add_argument("--vocab_size", type=int, default=None, help="tiny model's vocabulary (default 8192)")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes to measure")
    p.add_argument("--prompt_len", type=int, default=256, help="prompt tokens (one 256-token image)")
    p.add_argument("--new", type=int, default=256, help="tokens to generate (one image)")
    p.add_argument("--top_k", type=int, default=100)
    p.add_argument("--greedy", action="store_true", help="argmax decoding for both (default: top-k sampling)")
    p.add_argument("--compile", action="store_true", help="also measure the compiled decode step")
    p.add_argument("--skip_hf", action="store_true", help="do not run transformers (e.g. large models on GPU)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each, interleaved; median reported")
    p.add_argument("--hbm_tbps", type=float, default=None, help="HBM bandwidth in TB/s if the GPU is not known")
    p.add_argument("--inductor", nargs="+", default=[], metavar="NAME=VALUE", help="torch._inductor.config "
                   "settings for the compiled step, e.g. coordinate_descent_tuning=True max_autotune=True")
    p.add_argument("--profile", action="store_true", help="profile one more generate call (the compiled one with "
                   "--compile) and print its top operations")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    for setting in args.inductor:  # e.g. coordinate_descent_tuning=True
        name, _, value = setting.partition("=")
        setattr(torch._inductor.config, name, ast.literal_eval(value))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)
    tiny = {**TINY, **{k: getattr(args, k) for k in ("dim", "n_layers", "vocab_size") if getattr(args, k)}}
    tiny["hidden_dim"] = (8 * tiny["dim"] // 3 + 15) // 16 * 16  # LLaMA's SwiGLU width, 8/3 d rounded up: 688
    margs = ModelArgs(**(MODEL_SIZES[args.size] if args.size else tiny))
    with device:  # built where it runs: a 7B model's random init on a CPU would take minutes
        model = Transformer(margs)
    model = model.to(dtype=dtype).eval()
    n_params = model.num_params()
    # bytes each decode step must read: every weight but the input embedding table (one row per token)
    param_bytes = sum(t.numel() * t.element_size() for n, t in model.named_parameters() if "tok_emb" not in n)
    name = args.size or "tiny " + ",".join(f"{k}={v}" for k, v in tiny.items())
    print(f"model {name}: {n_params / 1e6:.1f}M parameters, {dtype}, {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})")
    temperature = 0.0 if args.greedy else 1.0
    how = "greedy" if args.greedy else f"top-k {args.top_k}"
    print(f"prompt {args.prompt_len} tokens, {args.new} new tokens, {how}; times are whole generate calls (prefill "
          "included)")

    hf = None
    if not args.skip_hf:
        from transformers import LlamaForCausalLM
        with tempfile.TemporaryDirectory() as tmp:
            save_hf(model, tmp)
            hf = LlamaForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa").to(device).eval()

    def hf_generate(prompt, new, greedy=args.greedy, **extra):
        with torch.inference_mode():  # min_new_tokens and no eos: exactly `new` tokens, as ours
            sampling = {} if greedy else dict(do_sample=True, top_k=args.top_k, top_p=1.0, temperature=1.0)
            return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                               min_new_tokens=new, eos_token_id=None, pad_token_id=0, **sampling, **extra)

    bw = hbm_bandwidth(device, args.hbm_tbps)
    for B in args.batch:
        prompt = torch.randint(0, margs.vocab_size, (B, args.prompt_len), device=device)
        run = lambda compile=False, new=args.new: generate(model, prompt, new, temperature, args.top_k,
                                                           compile=compile)
        if hf is not None and B == args.batch[0]:  # same weights: greedy decoding must agree token for token
            ours, theirs = generate(model, prompt, 32, 0.0), hf_generate(prompt, 32, greedy=True)
            agree = (ours[:, args.prompt_len:] == theirs[:, args.prompt_len:]).float().mean().item()
            print(f"greedy agreement with transformers over 32 tokens: {agree:.1%}")
        runners = {"ours (eager)": run}
        if args.compile:
            t0 = time.perf_counter()
            run(compile=True)  # the first call compiles (and records CUDA graphs)
            sync(device)
            print(f"batch {B}: compiling the decode step took {time.perf_counter() - t0:.1f} s")
            runners["ours (compiled)"] = lambda: run(compile=True)
        if hf is not None:
            runners["transformers"] = lambda: hf_generate(prompt, args.new)
            if device.type == "cuda" or args.compile:
                runners["transformers (static cache)"] = lambda: hf_generate(prompt, args.new,
                                                                             cache_implementation="static")
        for fn in runners.values():  # warm-up: allocator, thread pools, HF's static cache
            fn()
        results = interleaved(runners, device, args.repeats)
        print(f"\nbatch {B} (median of {args.repeats} interleaved runs, slowest-fastest in brackets; load average "
              f"{os.getloadavg()[0]:.1f}):")
        on_cpu = device.type == "cpu"
        for label, (walls, cpu, out) in results.items():
            assert out.shape == (B, args.prompt_len + args.new)
            median = statistics.median(walls)
            print(f"  {label:28s} {B * args.new / median:9.1f} tokens/s ({B * args.new / max(walls):.1f}-"
                  f"{B * args.new / min(walls):.1f})   {median:7.3f} s per {args.new} tokens = "
                  f"{median / B:.4f} s per image at batch {B}"
                  + (f"   CPU time {cpu / args.new * 1e3:.2f} ms per step" if on_cpu else ""))
        if hf is not None:  # speed-up round by round: the runs of one round met the same load
            hf_walls, hf_cpu, _ = results["transformers"]
            for label, (walls, cpu, _) in results.items():
                if label.startswith("ours"):
                    ratios = [theirs / ours for theirs, ours in zip(hf_walls, walls)]
                    print(f"  {label} / transformers: {statistics.median(ratios):.2f}x tokens/s (median; rounds "
                          f"{min(ratios):.2f}-{max(ratios):.2f}x"
                          + (f"; CPU time {hf_cpu / cpu:.2f}x)" if on_cpu else ")"))
        if bw:
            cache_len = args.prompt_len + args.new
            kv_bytes = 2 * margs.n_layers * margs.n_kv_heads * margs.head_dim * cache_len * B * dtype.itemsize
            bound = B * bw / param_bytes
            print(f"  bandwidth bound ({bw / 1e12:.2f} TB/s): {param_bytes / 1e9:.3f} GB of weights per step -> "
                  f"{bound:.0f} tokens/s ({args.new * B / bound:.3f} s per {args.new} tokens); with the whole "
                  f"{kv_bytes / 1e9:.3f} GB static key/value cache read each step too: "
                  f"{B * bw / (param_bytes + kv_bytes):.0f} tokens/s")
        elif device.type == "cuda":
            print("  bandwidth bound: unknown GPU, pass --hbm_tbps")
        if device.type == "cpu":
            floor = matvec_floor(model, B, device)
            line = (f"  floor: the step's matrix products alone take {floor * 1e3:.2f} ms as BLAS calls (every weight "
                    f"read once) -> {B / floor:.0f} tokens/s at most for an eager loop")
            if hf is not None:
                hf_step = statistics.median(results["transformers"][0]) / args.new
                line += f"; transformers' time per token is {hf_step / floor:.2f}x that"
            if args.compile:
                fused = matvec_floor(model, B, device, compile=True)
                line += f"; compiled as our step does them: {fused * 1e3:.2f} ms -> {B / fused:.0f} tokens/s"
            print(line)
        if args.profile:
            label = "ours (compiled)" if args.compile else "ours (eager)"
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            sync(device)
            t0 = time.perf_counter()
            with torch.profiler.profile(activities=activities) as prof:
                runners[label]()
                sync(device)
            wall = time.perf_counter() - t0
            events = prof.key_averages()
            key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(f"\n{label}, one generate call under the profiler ({wall:.3f} s wall), by {key}:")
            print(events.table(sort_by=key, row_limit=25, max_name_column_width=70))
            if device.type == "cuda":  # kernels far below the wall time: the GPU waits on launches
                busy = sum(e.self_device_time_total for e in events) / 1e6
                print(f"GPU kernels {busy:.3f} s of {wall:.3f} s wall ({100 * busy / wall:.0f}% busy)")


if __name__ == "__main__":
    main()
