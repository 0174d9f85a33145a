"""
A tiny real-photo dataset for the real-size path (bench/real_scale.sh), in ADE20K's folder layout so every
script reads it as it reads ADE20K:

    python bench/photos.py --out data/photos                   # scikit-image's sample photos (pip download)
    python bench/photos.py --out data/photos --photos DIR      # any folder of photos instead

    OUT/images/{training,validation}/NAME.jpg       the photos, split 3:1
    OUT/annotations/{training,validation}/NAME.png  class-index maps: the photo's luminance in four quartiles as ADE
                                                    ids 1, 6, 31, 150 (far apart in its palette), a crude but
                                                    real per-pixel annotation
    OUT/colour/{training,validation}/NAME.png       the same maps in ADE20K's colours, as the model sees them (for
                                                    sample.py's prompts)
With --vqgan_out DIR it also writes a VQ-GAN of the released f16-8192 layout with RANDOM weights (for when LVM's
released tokenizer is not at hand: the shapes, memory and times are the real ones, the pictures are not).
"""
import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

if __package__ in (None, ""):  # run as `python bench/NAME.py`: import the repository's modules, not bench/'s
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from infra.images import PALETTES, annotation_luts  # noqa: E402  (after the path fix above)

PHOTO_EXTS = (".jpg", ".jpeg", ".png")
CLASS_IDS = np.array([1, 6, 31, 150])  # ADE20K ids: white, yellow, magenta and green in its palette


def scikit_image_photos(folder):
    """The colour photos shipped inside scikit-image's wheel (astronaut, coffee, chelsea, ...), unpacked from a
    `pip download` of it: no import of scikit-image, no network at run time beyond the package index."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "scikit-image", "-d", tmp],
                       check=True)
        wheel = next(Path(tmp).glob("scikit_image-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.startswith("skimage/data/") and name.endswith(PHOTO_EXTS):
                    (folder / Path(name).name).write_bytes(z.read(name))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="dataset folder to write (ADE20K layout)")
    p.add_argument("--photos", help="a folder of photos (default: scikit-image's sample photos)")
    p.add_argument("--min_side", type=int, default=256, help="skip smaller pictures")
    p.add_argument("--vqgan_out", help="also write a random-weight f16-8192 VQ-GAN here")
    a = p.parse_args()
    out = Path(a.out)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(a.photos) if a.photos else Path(tmp)
        if not a.photos:
            scikit_image_photos(source)
        if not source.is_dir():
            sys.exit(f"error: --photos {source} is not a folder of photos")
        photos = []
        for f in sorted(source.rglob("*")):
            if f.suffix.lower() in PHOTO_EXTS:
                image = Image.open(f)
                if image.mode in ("RGB", "RGBA") and min(image.size) >= a.min_side:
                    photos.append((f.stem, image.convert("RGB")))
        if len(photos) < 4:
            sys.exit(f"error: {source} holds {len(photos)} colour photos of at least {a.min_side} px; "
                     "pass --photos DIR with 4 or more")
        for i, (name, image) in enumerate(photos):
            split = "validation" if i % 4 == 3 else "training"
            luminance = np.asarray(image.convert("L"), dtype=np.float32)
            quartile = np.searchsorted(np.quantile(luminance, [0.25, 0.5, 0.75]), luminance)
            classes = CLASS_IDS[quartile]
            coloured = annotation_luts(PALETTES["ade20k"], "ade20k")["index"][classes]
            for kind, picture, ext in (("images", image, "jpg"),
                                       ("annotations", Image.fromarray(classes.astype(np.uint8)), "png"),
                                       ("colour", Image.fromarray(coloured), "png")):
                folder = out / kind / split
                folder.mkdir(parents=True, exist_ok=True)
                picture.save(folder / f"{name}.{ext}", quality=95)
    print(f"{len(photos)} photos -> {out} (images/, annotations/; training and validation)")
    if a.vqgan_out:
        import torch
        import vqgan
        from infra import vqgan_checkpoint
        torch.manual_seed(0)
        model = vqgan.VQGAN(vqgan.CONFIGS["f16-8192"])
        vqgan_checkpoint.save_pretrained(model, a.vqgan_out)
        print(f"RANDOM weights: an f16-8192 VQ-GAN ({sum(t.numel() for t in model.parameters()) / 1e6:.1f}M "
              f"parameters, the released layout) -> {a.vqgan_out}; pass LVM's released tokenizer for real codes")


if __name__ == "__main__":
    main()
