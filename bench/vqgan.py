"""
Measure a VQ-GAN tokenizer: encode throughput in images/s (batched, no-grad, on the CPU and on the GPU when there is
one, fp32 and bf16 autocast there), or, with --data, its round-trip quality on a folder of images: PSNR, L1, codebook
usage, code perplexity and, with --palette, the share of pixels of flat-colour maps (segmentation) whose decoded colour
is still nearest to the right palette colour. Speed does not depend on the weights, so without --ckpt the model is the
full-size released architecture (f16-8192) with random weights.

    OMP_NUM_THREADS=2 python bench/vqgan.py                       # encode speed of f16-8192 at 256x256
    python bench/vqgan.py --ckpt out/vqgan_toy --batch_size 256 --iters 10 --decode
    python bench/vqgan.py --ckpt out/vqgan_toy --data data/toyworld/val/segmentation --palette data/toyworld/meta.json
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python bench/NAME.py`: import the repository's modules, not bench/'s
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import vqgan
from infra import vqgan_checkpoint
from tools import vqgan_train
from infra.images import load_images


def timed(fn, x, iters, device):
    """Seconds per call of fn(x), after one warm-up call."""
    fn(x)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def palette_survival(images, recon, palette):
    """% of pixels whose reconstructed colour is nearest (in RGB) to the palette colour the original pixel has."""
    pal = torch.tensor(palette, dtype=torch.float32) / 255  # [P, 3]

    def nearest(x):  # [N, 3, H, W] in [0, 1] -> palette index per pixel
        return torch.cdist(x.permute(0, 2, 3, 1).reshape(-1, 3), pal).argmin(1)
    return 100.0 * (nearest(images.float() / 255) == nearest(recon)).float().mean().item()


def quality(model, folder, palette=None):
    """Round-trip metrics of model on every image under folder. palette: None, 'auto' (the folder's own colours,
    for a folder of annotation maps) or a JSON file holding a list of [r, g, b] or a dict with a 'palette' entry."""
    images = load_images(folder, model.config["resolution"])
    metrics, recon = vqgan_train.evaluate(model, images)
    if palette == "auto":
        palette = torch.unique(images.permute(0, 2, 3, 1).reshape(-1, 3), dim=0).tolist()
    elif palette:
        palette = json.loads(Path(palette).read_text())
        palette = palette["palette"] if isinstance(palette, dict) else palette
    if palette:
        metrics.update(palette_survival=palette_survival(images, recon, palette), palette_size=len(palette))
    return dict(metrics, images=len(images), folder=str(folder))


def speed(model, name, args):
    R = args.resolution or model.config["resolution"]
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" not in devices:
        print("GPU: not measured (no CUDA device here)")
    for device in devices:
        model.to(device)
        x = torch.rand(args.batch_size, 3, R, R, device=device)
        for bf16 in ([False, True] if device == "cuda" else [False]):
            row = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                       threads=torch.get_num_threads(), model=name, resolution=R, batch_size=args.batch_size,
                       autocast="bf16" if bf16 else "fp32")
            with torch.inference_mode():
                s = timed(lambda im: model.encode(im, batch_size=args.batch_size, bf16=bf16), x, args.iters, device)
                row["encode_images_per_s"] = round(args.batch_size / s, 3)
                if args.decode:
                    codes = model.encode(x, bf16=bf16)
                    s = timed(lambda c: model.decode(c, batch_size=args.batch_size, bf16=bf16), codes, args.iters, device)
                    row["decode_images_per_s"] = round(args.batch_size / s, 3)
            print(json.dumps(row))


def main(argv=None):
    p = argparse.ArgumentParser(description="Measure a VQ-GAN: encode (and decode) images/s, or round-trip quality.")
    p.add_argument("--config", default="f16-8192", help=f"model config: {', '.join(vqgan.CONFIGS)}")
    p.add_argument("--ckpt", default=None, help="a checkpoint directory (default: a randomly initialised --config)")
    p.add_argument("--data", default=None, help="measure round-trip quality on this image folder instead of speed")
    p.add_argument("--palette", default=None, help="with --data: 'auto' or a JSON palette file (palette survival)")
    p.add_argument("--resolution", type=int, default=None, help="image side (default: the config's resolution)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--iters", type=int, default=3, help="timed batches after one warm-up batch")
    p.add_argument("--decode", action="store_true", help="time decode as well")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the CPU, and the GPU too when present)")
    args = p.parse_args(argv)
    if args.data and not args.ckpt:
        p.error("--data measures a trained tokenizer: pass --ckpt DIR as well")
    torch.manual_seed(0)
    if args.ckpt:
        model = vqgan_checkpoint.load_pretrained(args.ckpt, device=args.device or "cpu")
    else:
        model = vqgan.VQGAN(vqgan.CONFIGS[args.config]).eval()
    if args.data:
        result = quality(model, args.data, args.palette)
        print(json.dumps(result))
        return result
    speed(model, args.ckpt or args.config, args)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
