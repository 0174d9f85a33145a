"""
Weight-only quantization on this machine, layer by layer: the seven linear layers of LVM-7B's blocks (hidden 4096,
MLP 11008), a few blocks' worth (1.6 GB in bfloat16, far more than any cache, so every weight comes from memory as in
the whole model), one token at a time, as decoding runs them. Each way is timed eager and compiled:

- bfloat16: nn.Linear, the baseline;
- ours, int8: infra/quantize.Int8Linear (torch's _weight_int8pack_mm); also the plain form, F.linear of the weight
  cast to bfloat16 times the scales, which a compiled graph may fuse;
- ours, int4: infra/quantize.Int4Linear (torch's _weight_int4pack_mm_for_cpu), groups of 128;
- torchao's Int8WeightOnlyConfig and, for int4, IntxWeightOnlyConfig (groups of 128), when torchao is installed.

    python bench/quantize.py              # 4 blocks' linears; prints a Markdown table
    python bench/quantize.py --blocks 2 --threads 2
    python bench/quantize.py --toy out/toy # the quality instead, on the toy demo's model (`python run_toy.py`)

Reported: milliseconds per token for the 7 x blocks linears, the weight bytes read per second (GB/s), and the speed
against bfloat16's (the same call kind: eager against eager, compiled against compiled).

--toy: the toy demo's stage-2 model in float32, int8 and int4, on its scored protocol (evaluate.eval_segmentation:
one prompt pair from the training split, the 96 held-out queries run_toy.py scores): greedy answer tokens (how many
positions agree with the unquantized model's), then the protocol as scored (top-k 100, temperature 1, seed 0): mIoU
and answer-token accuracy; and the logits' relative error over 8 held-out videos (256 tokens each).
"""
import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

if __package__ in (None, ""):  # run as `python bench/NAME.py`: import the repository's modules, not bench/'s
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from infra import quantize  # noqa: E402

SHAPES = [(4096, 4096)] * 4 + [(11008, 4096), (4096, 11008), (11008, 4096)]  # wq wk wv wo, w1 w2 w3: (out, in)


class Linears(nn.Module):
    """blocks x the seven linear layers; forward runs each on its own one-token input (shapes differ)."""

    def __init__(self, blocks):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(i, o, bias=False, dtype=torch.bfloat16)
                                    for _ in range(blocks) for o, i in SHAPES)
        for layer in self.layers:
            nn.init.normal_(layer.weight, std=0.02)
        self.sizes = [i for _ in range(blocks) for _, i in SHAPES]  # each layer's input width

    def forward(self, inputs):
        return [layer(inputs[n]) for layer, n in zip(self.layers, self.sizes)]


class PlainInt8(nn.Module):
    """The int8 linear written without torch's int8 kernel: the weight cast to the input's dtype inside F.linear."""

    def __init__(self, linear):
        super().__init__()
        q, scale = quantize.int8_weight(linear.weight, linear.weight.dtype)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype)) * self.scale


def ours(model, mode):
    model = copy.deepcopy(model)
    for i, layer in enumerate(model.layers):
        tensors = quantize.quantize_weight("weight", layer.weight.detach(), mode, torch.bfloat16)
        model.layers[i] = (quantize.Int8Linear(tensors["weight"], tensors["scale"]) if mode == "int8" else
                           quantize.Int4Linear(tensors["weight"], tensors["scales_and_zeros"], layer.out_features))
    return model


def plain(model):
    model = copy.deepcopy(model)
    for i, layer in enumerate(model.layers):
        model.layers[i] = PlainInt8(layer)
    return model


def torchao(model, mode):
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    model = copy.deepcopy(model)
    # torchao 0.18's Int4WeightOnlyConfig packs for GPUs only (its CPU formats fail here): int4 on a CPU is Intx
    config = (Int8WeightOnlyConfig() if mode == "int8" else
              IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(128)))
    quantize_(model, config)
    return model


def weight_bytes(model):
    def nbytes(t):  # torchao's weights are tensor subclasses: count the tensors they hold
        if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
            return sum(nbytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
        return t.numel() * t.element_size()
    return sum(nbytes(t) for t in list(model.parameters()) + list(model.buffers()))


def time_per_call(fn, inputs, repeats):
    with torch.inference_mode():
        for _ in range(3):
            fn(inputs)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn(inputs)
    return (time.perf_counter() - t0) / repeats


def toy_quality(out, queries=96):
    """The table of --toy: a row per weight format of the toy demo's stage-2 model."""
    from dataclasses import replace
    import evaluate
    from data import load_tokens
    from infra.checkpoint import load_model
    from infra.vqgan_checkpoint import load_pretrained
    out = Path(out)
    tokenizer, world = load_pretrained(out / "vqgan", "cpu"), out / "world"
    answers = []  # the answer tokens of the last generate calls, recorded around evaluate's own call

    def recording(*args, **kwargs):
        seq = evaluate_generate(*args, **kwargs)
        answers.append(seq[:, -16:].clone())
        return seq
    evaluate_generate, evaluate.generate = evaluate.generate, recording
    cfg = evaluate.EvalConfig(limit=queries, prompt_split="train")
    # logits over held-out sequences: 8 of the held-out videos' 256 tokens (16 frames of 16 tokens)
    frames = load_tokens(out / "tokens" / "val_video").tokens[:8 * 16]
    sequences = torch.as_tensor(frames.astype("int64")).view(8, 256)
    rows = ["| weights | greedy answer tokens agreeing with float32 | mIoU, greedy (%) | mIoU, as scored (%) | "
            "answer tokens right, as scored (%) | logits' relative error |", "|---|---|---|---|---|---|"]
    reference = reference_logits = None
    for mode in (None, "int8", "int4"):
        model = load_model(out / "stage2", "cpu", quantize=mode)
        answers.clear()
        greedy = evaluate.eval_segmentation(model, tokenizer, world, replace(cfg, temperature=0))
        tokens = torch.cat(answers)
        scored = evaluate.eval_segmentation(model, tokenizer, world, cfg)
        with torch.inference_mode():
            logits = model(sequences)[0].float()
        if mode is None:
            reference, reference_logits = tokens, logits
        agree = (tokens == reference).float().mean().item()
        error = ((logits - reference_logits).norm() / reference_logits.norm()).item()
        rows.append(f"| {mode or 'float32'} | {100 * agree:.1f}% of {tokens.numel()} | {greedy['model']['miou']:.1f} | "
                    f"{scored['model']['miou']:.1f} | {scored['model']['token_accuracy']:.1f} | "
                    f"{'-' if mode is None else f'{error:.4f}'} |")
        print(rows[-1], flush=True)
    evaluate.generate = evaluate_generate
    print("\n".join(rows))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--toy", metavar="OUT", help="the quality on the toy demo's models in OUT (e.g. out/toy) instead")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    if a.toy:
        return toy_quality(a.toy)
    base = Linears(a.blocks)
    inputs = {n: torch.randn(1, n, dtype=torch.bfloat16) for n in (4096, 11008)}
    ways = [("bfloat16 nn.Linear", lambda: base), ("ours, int8 (_weight_int8pack_mm)", lambda: ours(base, "int8")),
            ("ours, int8 plain (F.linear of the cast weight)", lambda: plain(base)),
            ("ours, int4 (_weight_int4pack_mm_for_cpu)", lambda: ours(base, "int4"))]
    try:
        import torchao as _  # noqa: F401
        ways += [("torchao Int8WeightOnlyConfig", lambda: torchao(base, "int8")),
                 ("torchao IntxWeightOnlyConfig int4, groups of 128", lambda: torchao(base, "int4"))]
    except ImportError:
        print("torchao is not installed: its rows are left out")
    print(f"{a.blocks} blocks' linears of LVM-7B, one token, {a.threads} threads, torch {torch.__version__}")
    rows = ["| way | weights (GB) | eager (ms) | eager GB/s | eager vs bf16 | compiled (ms) | compiled GB/s | "
            "compiled vs bf16 |", "|---|---|---|---|---|---|---|---|"]
    baseline = {}
    for name, build in ways:
        try:
            model = build()
        except Exception as e:  # a way this torch or CPU lacks: say so and go on
            rows.append(f"| {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:80]} |")
            print(rows[-1], flush=True)
            continue
        gb = weight_bytes(model) / 1e9
        cells = []
        for kind in ("eager", "compiled"):
            fn = model if kind == "eager" else torch.compile(model, fullgraph=False, dynamic=False)
            try:
                t = time_per_call(fn, inputs, a.repeats)
            except Exception as e:
                cells += [f"failed: {type(e).__name__}", "", ""]
                continue
            baseline.setdefault(kind, t)
            cells += [f"{t * 1e3:.1f}", f"{gb / t:.1f}", f"{baseline[kind] / t:.2f}x"]
        rows.append(f"| {name} | {gb:.2f} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
        del model
        torch._dynamo.reset()
    print("\n".join(rows))


if __name__ == "__main__":
    main()
