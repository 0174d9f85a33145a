"""
LVM's released 7B as a user meets it on one machine: a checkpoint of its exact shape (Hugging Face LlamaForCausalLM,
hidden 4096, MLP 11008, 32 layers, vocabulary 8292, bfloat16 safetensors in 3 shards, 13 GB) with RANDOM weights,
written once; then `sample.py` answering a one-pair prompt (prompt pair + query = 3 images) with two tokenizer
layouts of the released kind (8192 codes): 16 tokens per image and the paper's 256.

    python bench/released_7b.py --dir /tmp/lvm7b-random            # writes the checkpoint the first time
    python bench/released_7b.py --dir /tmp/lvm7b-random --layers 4  # a quick look (a 4-layer model of that width)

Reported: sample.py end to end (wall, peak RSS) with the 16-token layout; then in this process, for each layout,
eager and compiled: the time from loading to the first token with a cold file cache (the checkpoint's pages dropped
with posix_fadvise) and a warm one, peak memory, prefill tokens/s (the 3 prompt images) and decode tokens/s (32 new
tokens).
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


def measure(folder, layout, compile, new=32):
    """(first token cold s, first token warm s, peak GB, prefill tok/s, decode tok/s) for a one-pair prompt of 3
    images. The weights are memory-mapped (safetensors), so loading reads them only when the first forward pass
    touches them: the time to the first token is what a user waits for, with a cold file cache or a warm one."""
    prompt = torch.randint(0, 8192, (1, 3 * layout))
    first_token = []
    for cache in ("cold", "warm"):
        if cache == "cold":
            drop_file_cache(folder)
        t0 = time.time()
        model = load_model(folder, "cpu", "auto")
        generate(model, prompt, 1, codebook_size=8192)
        first_token.append(time.time() - t0)
        if cache == "cold":
            del model
    run = lambda n: generate(model, prompt, n, codebook_size=8192, compile=compile,
                             generator=torch.Generator().manual_seed(0))
    run(2)  # the first call compiles (with compile) and warms up
    t0 = time.time()
    run(1)
    prefill = time.time() - t0
    t0 = time.time()
    run(new + 1)
    decode = (time.time() - t0 - prefill) / new
    return (*first_token, peak_gb(), 3 * layout / prefill, 1 / decode)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/lvm7b-random", help="where the random 7B-shaped checkpoint lives")
    p.add_argument("--layers", type=int, default=32, help="fewer layers for a quick look (the 7B has 32)")
    p.add_argument("--layouts", type=int, nargs="+", default=[16, 256], help="tokens per image")
    a = p.parse_args()
    args = ModelArgs(**{**MODEL_SIZES["lvm-7b"], "n_layers": a.layers})
    folder = Path(a.dir)
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
        timed = subprocess.run(["/usr/bin/time", "-f", "%e %M", *command], capture_output=True, text=True)
        wall, kb = timed.stderr.split()[-2:]
        print(f"sample.py, one pair, {a.layouts[0]} tokens per image: exit {timed.returncode}, {float(wall):.1f} s, "
              f"peak RSS {int(kb) / 2**20:.1f} GB", flush=True)
        rows = ["| tokens per image | decoding | load + first token, cold cache (s) | the same, warm (s) | peak (GB) | "
                "prefill (tok/s) | decode (tok/s) |", "|---|---|---|---|---|---|---|"]
        for layout in a.layouts:
            for compile in (False, True):
                cold, warm, peak, prefill, decode = measure(folder, layout, compile)
                rows.append(f"| {layout} | {'compiled' if compile else 'eager'} | {cold:.1f} | {warm:.1f} | "
                            f"{peak:.1f} | {prefill:.1f} | {decode:.2f} |")
                print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
