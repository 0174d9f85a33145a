"""
Tokenization throughput against the bare VQ-GAN encoder on the same images (the aim: at least 90% of it).

    python bench/tokens.py --vqgan out/vqgan_toy --images data/toyworld/train/images --limit 2000
    python bench/tokens.py --vqgan_config f16-8192 --images photos/ --limit 64 --batch_size 16   # random weights

bare encoder:  the images decoded beforehand, held in memory as float [B, 3, H, W] batches; time of encode() alone.
tokenize_data: the whole path on the same files, into a fresh folder: listing, decoding in --num_workers processes,
               encoding, writing, the resume commits. Model loading is outside both timings.
The two run back to back --repeats times; reported: the median of each and the median of the per-pair ratios
(pairs see about the same load when the machine is shared).
The two must give identical tokens; the script checks it.
"""
import argparse
import sys
from pathlib import Path
import json
import os
import shutil
import tempfile
import time

import numpy as np
import torch

if __package__ in (None, ""):  # run as `python bench/NAME.py`: import the repository's modules, not bench/'s
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import tokenize_data as td
from infra.images import read_image


def bare_encoder(model, x, batch_size):
    """Seconds to encode x (float [N, 3, H, W] in [0, 1]) and the tokens."""
    t0 = time.perf_counter()
    tokens = [model.encode(x[i:i + batch_size], batch_size=batch_size) for i in range(0, len(x), batch_size)]
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, torch.cat(tokens).cpu().numpy().astype(np.uint16)


def pipeline(units, model, tokenizer, size, args):
    """Seconds for tokenize_data to tokenize `units` from scratch, and the tokens."""
    out = tempfile.mkdtemp(prefix="bench_tokenize_")
    try:
        t0 = time.perf_counter()
        td.tokenize(units, "images", {"size": size}, model, tokenizer, out, "bench", {}, args.batch_size,
                    args.num_workers)
        seconds = time.perf_counter() - t0
        return seconds, np.array(td.load_tokens(os.path.join(out, "bench")).tokens)
    finally:
        shutil.rmtree(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--images", required=True, help="image folder (recursive)")
    p.add_argument("--vqgan", help="VQ-GAN checkpoint directory")
    p.add_argument("--vqgan_config", help="or: random weights of this vqgan.CONFIGS entry (same speed)")
    p.add_argument("--limit", type=int, default=2000, help="images to use")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--num_workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) - 1)))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default=None)
    args = p.parse_args()
    model, tokenizer = td.load_tokenizer(args.vqgan, args.vqgan_config, device=args.device)
    size = tokenizer["resolution"]
    units = [u for u in td.list_images([args.images]) if u[0] == "image"][:args.limit]
    pixels = np.stack([read_image(u[1], size) for u in units])
    device = next(model.parameters()).device
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().float().div_(255).to(device)
    model.encode(x[:args.batch_size], batch_size=args.batch_size)  # warm-up: kernels, allocator
    bare, piped = [], []
    for _ in range(args.repeats):
        seconds, bare_tokens = bare_encoder(model, x, args.batch_size)
        bare.append(len(units) / seconds)
        seconds, piped_tokens = pipeline(units, model, tokenizer, size, args)
        piped.append(len(units) / seconds)
    result = dict(images=len(units), resolution=size, batch_size=args.batch_size, num_workers=args.num_workers,
                  device=str(device), torch_threads=torch.get_num_threads(),
                  bare_encoder_img_s=round(float(np.median(bare)), 1),
                  tokenize_data_img_s=round(float(np.median(piped)), 1),
                  ratio=round(float(np.median(np.array(piped) / np.array(bare))), 3),
                  identical_tokens=bool(np.array_equal(bare_tokens, piped_tokens)),
                  runs={"bare": [round(v, 1) for v in bare], "tokenize_data": [round(v, 1) for v in piped]})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
