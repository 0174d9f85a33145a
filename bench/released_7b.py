"""
LVM's released 7B as a user meets it on one machine: a checkpoint of its exact shape (Hugging Face LlamaForCausalLM,
hidden 4096, MLP 11008, 32 layers, vocabulary 8292, bfloat16 safetensors in 3 shards, 13 GB) with RANDOM weights,
written once; then `sample.py` answering a one-pair prompt (prompt pair + query = 3 images) with two tokenizer
layouts of the released kind (8192 codes): 16 tokens per image and the paper's 256.

    python bench/released_7b.py --dir /tmp/lvm7b-random            # writes the checkpoint the first time
    python bench/released_7b.py --dir /tmp/lvm7b-random --layers 4  # a quick look (a 4-layer model of that width)
    python bench/released_7b.py --quantize none int8 int4           # bfloat16 against int8 and int4 weights

Reported, for each weight format (--quantize: none is the checkpoint's bfloat16): sample.py end to end (wall, peak
RSS) with the 16-token layout; then for each layout, eager and compiled, each in a process of its own (so each peak
is its own): the time from loading to the first token with a cold file cache (the checkpoint's pages dropped with
posix_fadvise) and a warm one, peak memory, prefill tokens/s (the 3 prompt images) and decode tokens/s (32 new
tokens); for a quantized format, the relative error of its logits over the prompt against bfloat16's
(||l_q - l|| / ||l||) and how often their argmax agrees.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python bench/NAME.py`: import the repository's modules, not bench/'s
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import vqgan  # noqa: E402
from infra import vqgan_checkpoint
from infra.checkpoint import hf_config, load_model, rename  # noqa: E402
from configs import MODEL_SIZES  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from sample import generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def write_checkpoint(folder, args, shard_bytes=5 * 2**30):
    """Random bfloat16 weights of args' shapes, written shard by shard (never the whole model in memory)."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {rename(k, to_hf=True): v.shape for k, v in Transformer(args).state_dict().items()}
    groups, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = 2 * shape.numel()
        if groups[-1] and size + nbytes > shard_bytes:
            groups, size = groups + [[]], 0
        groups[-1].append(name)
        size += nbytes
    weight_map, generator = {}, torch.Generator().manual_seed(0)
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {n: (torch.randn(shapes[n], generator=generator) * 0.02).to(torch.bfloat16) for n in names}
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
        del shard
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(hf_config(args, "bfloat16"), indent=2))


def tokenizer(folder, tokens_per_image):
    """A random VQ-GAN of the released kind (f16, 8192 codes) small enough not to matter, at the resolution that
    gives tokens_per_image codes."""
    side = int(tokens_per_image ** 0.5) * 16
    config = dict(resolution=side, hidden_channels=32, channel_mult=[1, 1, 2, 2, 4], num_res_blocks=1,
                  num_embeddings=8192, quantized_embed_dim=16, norm_groups=8)  # the rest: f16-8192's
    torch.manual_seed(0)
    vqgan_checkpoint.save_pretrained(vqgan.VQGAN(config), folder)
    return folder


def drop_file_cache(folder):
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def peak_gb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 2**20


def measure(folder, layout, compile, quantize=None, new=32, logits_file=None):
    """(first token cold s, first token warm s, peak GB, prefill tok/s, decode tok/s, logits' relative error,
    argmax agreement) for a one-pair prompt of 3 images. bfloat16 weights are memory-mapped (safetensors), so
    loading reads them only when the first forward pass touches them: the time to the first token is what a user
    waits for, with a cold file cache or a warm one. Quantized weights are read and quantized while loading.
    logits_file: bfloat16's logits over the prompt are saved there, a quantized model's compared with them."""
    prompt = torch.randint(0, 8192, (1, 3 * layout), generator=torch.Generator().manual_seed(0))
    first_token = []
    for cache in ("cold", "warm"):
        if cache == "cold":
            drop_file_cache(folder)
        t0 = time.time()
        model = load_model(folder, "cpu", "auto", quantize=quantize)
        generate(model, prompt, 1, codebook_size=8192)
        first_token.append(time.time() - t0)
        if cache == "cold":
            del model
    error = agreement = float("nan")
    if logits_file is not None:
        with torch.inference_mode():
            logits = model(prompt)[0][0].float()
        if quantize is None:
            torch.save(logits, logits_file)
        elif Path(logits_file).exists():
            reference = torch.load(logits_file)
            error = ((logits - reference).norm() / reference.norm()).item()
            agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    run = lambda n: generate(model, prompt, n, codebook_size=8192, compile=compile,
                             generator=torch.Generator().manual_seed(0))
    run(2)  # the first call compiles (with compile) and warms up
    t0 = time.time()
    run(1)
    prefill = time.time() - t0
    t0 = time.time()
    run(new + 1)
    decode = (time.time() - t0 - prefill) / new
    return (*first_token, peak_gb(), 3 * layout / prefill, 1 / decode, error, agreement)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/lvm7b-random", help="where the random 7B-shaped checkpoint lives")
    p.add_argument("--layers", type=int, default=32, help="fewer layers for a quick look (the 7B has 32)")
    p.add_argument("--layouts", type=int, nargs="+", default=[16, 256], help="tokens per image")
    p.add_argument("--quantize", nargs="+", default=["none", "int8"], choices=["none", "int8", "int4"],
                   help="weight formats to time (none: the checkpoint's bfloat16), in this order")
    p.add_argument("--skip_sample_py", action="store_true", help="leave out the sample.py runs (the table only)")
    p.add_argument("--row", nargs=4, metavar=("FORMAT", "LAYOUT", "COMPILE", "LOGITS"),
                   help="(used by the script itself) measure one row in this process and print it as JSON")
    a = p.parse_args()
    folder = Path(a.dir)
    if a.row:
        mode, layout, compile, logits = a.row
        print(json.dumps(measure(folder, int(layout), compile == "1", None if mode == "none" else mode,
                                 logits_file=None if logits == "-" else logits)))
        return
    args = ModelArgs(**{**MODEL_SIZES["lvm-7b"], "n_layers": a.layers})
    if not (folder / "config.json").exists():
        t0 = time.time()
        write_checkpoint(folder, args)
        print(f"wrote {folder} ({sum(f.stat().st_size for f in folder.iterdir()) / 1e9:.1f} GB) in "
              f"{time.time() - t0:.0f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vq = {n: tokenizer(tmp / f"vq{n}", n) for n in a.layouts}
        from PIL import Image
        pictures = []
        for i in range(3):
            pictures.append(tmp / f"{i}.png")
            Image.fromarray(torch.randint(0, 256, (256, 256, 3), dtype=torch.uint8).numpy()).save(pictures[-1])
        command = [sys.executable, str(ROOT / "sample.py"), "--model", str(folder), "--vqgan", str(vq[a.layouts[0]]),
                   "--prompt", str(pictures[0]), str(pictures[1]), "--query", str(pictures[2]), "--device", "cpu",
                   "--out_dir", str(tmp / "out")]
        for mode in [] if a.skip_sample_py else a.quantize:
            quantize = [] if mode == "none" else ["--quantize", mode]
            timed = subprocess.run(["/usr/bin/time", "-f", "%e %M", *command, *quantize], capture_output=True,
                                   text=True)
            wall, kb = timed.stderr.split()[-2:]
            print(f"sample.py {' '.join(quantize) or '(bfloat16)'}, one pair, {a.layouts[0]} tokens per image: exit "
                  f"{timed.returncode}, {float(wall):.1f} s, peak RSS {int(kb) / 2**20:.1f} GB", flush=True)
        rows = ["| weights | tokens per image | decoding | load + first token, cold cache (s) | the same, warm (s) | "
                "peak (GB) | prefill (tok/s) | decode (tok/s) | logits' relative error | argmax agrees |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for mode in a.quantize:
            for layout in a.layouts:
                for compile in (False, True):
                    logits = str(tmp / f"logits{layout}.pt") if not compile else "-"
                    row = [sys.executable, __file__, "--dir", str(folder), "--row", mode, str(layout),
                           str(int(compile)), logits]
                    done = subprocess.run(row, capture_output=True, text=True)
                    if done.returncode:
                        rows.append(f"| {mode} | {layout} | {'compiled' if compile else 'eager'} | failed: "
                                    f"{(done.stderr.strip().splitlines() or [''])[-1][:120]} |")
                    else:
                        cold, warm, peak, prefill, decode, error, agree = json.loads(done.stdout.splitlines()[-1])
                        rows.append(f"| {'bfloat16' if mode == 'none' else mode} | {layout} | "
                                    f"{'compiled' if compile else 'eager'} | {cold:.1f} | {warm:.1f} | {peak:.1f} | "
                                    f"{prefill:.1f} | {decode:.2f} | "
                                    f"{'-' if error != error else f'{error:.4f}'} | "
                                    f"{'-' if agree != agree else f'{100 * agree:.1f}%'} |")
                    print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
