"""
The toy world: a tiny procedurally generated visual world in which every task of the paper exists in
miniature, so that the whole method (VQ-GAN, single-image pre-training, sequence fine-tuning,
in-context evaluation) can be trained and checked on a CPU in minutes. It is to LVM-Lite what
shakespeare_char is to nanoGPT.

    python toyworld.py --out data/toyworld --seed 0  # small PNGs, deterministic given --seed

What is in it (all 32x32 RGB PNG; a toy tokenizer reads it as 4x4 cells of 8x8 pixels, one token
each):
- images: 1-3 shapes (square, circle, triangle) of 8, 12 or 16 px on a tinted grey background, flat
  or with a gentle ramp. Positions and sizes sit on a 4-px grid. The class decides the hue (squares
  red, circles green, triangles blue, each jittered), so what a cell shows says which class it
  holds: each answer token of a task follows from the query at and near the same place, and the
  prompt decides which mapping applies.
- three annotations per image, same file stem, three tasks for the same images:
    segmentation/  flat class colours in the fixed PALETTE (background black), the answer to
                   "image -> segmentation"
    edges/         white object boundaries on black
    depth/         depth-like order on a ground plane: lower in the picture = nearer = brighter and
                   drawn on top
- videos: frame folders of a camera panning right at 4 px per frame (half a cell) along a wide strip
  of scene: shapes drift left through the view and out of it, new ones come in from the right, and
  every second frame is the one two before it shifted by exactly one cell. The background is a
  gentle ramp, so no frame repeats one before it (repeating the last frame never scores a perfect
  frame).
- a held-out split: val/ is drawn from its own random streams, so its pictures are not those of
  train/.

Layout, readable by tokenize_data.py's generic commands (image folder, frame folders, pairs matched
by stem):
    OUT/meta.json                                 classes, palette (also a palette file for
                                                  --palette), counts
    OUT/{train,val}/images/00000.png
    OUT/{train,val}/{segmentation,edges,depth}/00000.png
    OUT/{train,val}/videos/0000/00.png ... 19.png
Every item is drawn from its own generator seeded by (seed, split, kind, index), so item i does not
depend on how many items are asked for.
"""
import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from images import PALETTES

CLASSES = ("background", "square", "circle", "triangle")
# segmentation colours, index = class; flat and far apart so a nearest-colour read-out of a decoded
# map is easy (images.PALETTES["toy"], where every palette lives)
PALETTE = PALETTES["toy"]
SPLITS = {"train": 0, "val": 1}
DEFAULTS = dict(size=32, num_images=10000, num_val_images=200, num_videos=1000,
                num_val_videos=100, frames=20)
# shapes' positions and sides are multiples of GRID px, so an 8x8 token cell shows few partial
# shapes
GRID = 4
SIDES = (8, 12, 16)  # shape sizes in pixels: 1-2 token cells of a f=8 tokenizer
# the class decides the shape's hue (squares red, circles green, triangles blue), each channel
# jittered by +-COLOUR_JITTER; backgrounds are greys tinted by at most +-TINT per channel. So what a
# token shows says its class.
CLASS_COLOURS = np.array([[0, 0, 0], [215, 45, 45], [45, 190, 45], [55, 85, 230]])
COLOUR_JITTER, TINT = 30, 15
PAN = 4  # video camera speed, px per frame: half a token cell
SHAPES_PER_VIEW = 1.5  # shapes in a video's scene per view-sized area
# grey levels the background of a video's scene changes by from one side to the other
VIDEO_RAMP = 40
DEPTH_NEAR, DEPTH_FAR = 255, 80  # depth grey = FAR + (NEAR - FAR) * (shape's bottom edge) / size


def shape_mask(cls, x, y, side, size):
    """Boolean [H, W] mask of shape `cls` with its bounding box's top-left corner at (x, y);
    size = H = W, or (H, W)."""
    height, width = (size, size) if np.isscalar(size) else size
    u = (np.arange(width)[None, :] + 0.5 - x) / side  # [0, 1) inside the bounding box
    v = (np.arange(height)[:, None] + 0.5 - y) / side
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    if CLASSES[cls] == "circle":
        return inside & ((u - 0.5) ** 2 + (v - 0.5) ** 2 < 0.25)
    if CLASSES[cls] == "triangle":  # apex up
        return inside & (np.abs(u - 0.5) <= v / 2)
    return inside


def background(rng, size, ramp=None):
    """Float [H, W, 3] (size = H = W, or (H, W)): a tinted grey, plus a linear ramp of `ramp` grey
    levels across the picture in a random direction (None: a ramp of up to 50 levels or none,
    evenly)."""
    height, width = (size, size) if np.isscalar(size) else size
    c1 = rng.uniform(60, 190) + rng.uniform(-TINT, TINT, 3)
    if ramp is None:
        ramp = rng.uniform(-50, 50) if rng.integers(2) else 0.0
    yy, xx = np.mgrid[0:height, 0:width]
    a = rng.uniform(0, 2 * np.pi)
    t = xx * np.cos(a) + yy * np.sin(a)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    return c1 + t[..., None] * ramp


def shape_colour(rng, cls):
    """The class's hue, each channel jittered."""
    return np.clip(CLASS_COLOURS[cls] + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255)


def render(bg, shapes):
    """Draw shapes far-to-near: (image uint8 [H, W, 3], class map, instance map (0 = background),
    depth grey). shapes: list of dicts with cls, x, y, side, colour. Nearer = lower bottom edge (a
    ground plane)."""
    image = bg.copy()
    classes = np.zeros(bg.shape[:2], np.uint8)
    instances = np.zeros(bg.shape[:2], np.uint8)
    depth = np.zeros(bg.shape[:2], np.uint8)
    for k, s in enumerate(sorted(shapes, key=lambda s: s["y"] + s["side"]), start=1):
        m = shape_mask(s["cls"], s["x"], s["y"], s["side"], bg.shape[:2])
        image[m] = s["colour"]
        classes[m], instances[m] = s["cls"], k
        depth[m] = round(DEPTH_FAR + (DEPTH_NEAR - DEPTH_FAR) * (s["y"] + s["side"]) / bg.shape[0])
    return np.round(image).astype(np.uint8), classes, instances, depth


def edges(instances):
    """White where a pixel's object differs from a 4-neighbour's (both sides of each boundary: 2 px
    lines); the picture's border counts as background, so every outline is closed."""
    p = np.pad(instances, 1)
    c = p[1:-1, 1:-1]
    return (c != p[:-2, 1:-1]) | (c != p[2:, 1:-1]) | (c != p[1:-1, :-2]) | (c != p[1:-1, 2:])


def sample_shapes(rng, size, max_overlap=0.25):
    """1-3 shapes fully inside the picture, on the GRID; each overlaps the others' boxes by at most
    max_overlap of its box (the last of 30 tries otherwise)."""
    shapes = []
    for _ in range(rng.integers(1, 4)):
        for _ in range(30):
            side = int(rng.choice(SIDES))
            x, y = (int(v) * GRID for v in rng.integers(0, (size - side) // GRID + 1, 2))
            overlap = max([_box_overlap((x, y, side), (s["x"], s["y"], s["side"]))
                           for s in shapes], default=0)
            if overlap <= max_overlap:
                break
        cls = int(rng.integers(1, len(CLASSES)))
        shapes.append(dict(cls=cls, x=x, y=y, side=side, colour=shape_colour(rng, cls)))
    return shapes


def _box_overlap(a, b):
    """Fraction of box a (x, y, side) covered by box b."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[2], b[1] + b[2]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0) / a[2] ** 2


def make_image(rng, size):
    """One picture with its three annotations, each uint8 [H, W, 3]."""
    bg = background(rng, size)
    image, classes, instances, depth = render(bg, sample_shapes(rng, size))
    grey = lambda a: np.repeat(a[..., None], 3, axis=2)
    return dict(images=image, segmentation=PALETTE[classes],
                edges=grey(edges(instances).astype(np.uint8) * 255), depth=grey(depth))


def make_video(rng, size, frames):
    """uint8 [frames, H, W, 3]: the camera pans right at PAN px per frame along a wide strip of
    scene scattered with shapes, so shapes drift left through the view and leave it while new ones
    come in from the right. The scene's background is a gentle ramp, so no two frames are alike even
    when no shape is in view."""
    width = size + (frames - 1) * PAN  # the strip holds every frame's view
    bg = background(rng, (size, width), ramp=VIDEO_RAMP * rng.choice([-1, 1]))
    shapes = []
    for _ in range(rng.poisson(SHAPES_PER_VIEW * width / size)):
        side = int(rng.choice(SIDES))
        x = int(rng.integers(0, (width - side) // GRID + 1)) * GRID
        y = int(rng.integers(0, (size - side) // GRID + 1)) * GRID
        cls = int(rng.integers(1, len(CLASSES)))
        shapes.append(dict(cls=cls, x=x, y=y, side=side, colour=shape_colour(rng, cls)))
    scene = render(bg, shapes)[0]
    return np.stack([scene[:, t * PAN:t * PAN + size] for t in range(frames)])


def _rng(seed, split, kind, index):
    return np.random.default_rng([seed, SPLITS[split], kind, index])


def _write_item(job):
    """Worker: draw and save item `index` of `split` (kind 0: an image and its annotations, 1: a
    video)."""
    tmp, seed, split, kind, index, c = job
    # fast zlib; PNG stays lossless
    save = lambda arr, path: Image.fromarray(arr).save(path, compress_level=1)
    if kind == 0:
        for name, arr in make_image(_rng(seed, split, 0, index), c["size"]).items():
            save(arr, tmp / split / name / f"{index:05d}.png")
    else:
        folder = tmp / split / "videos" / f"{index:04d}"
        folder.mkdir(parents=True)
        for t, frame in enumerate(make_video(_rng(seed, split, 1, index), c["size"], c["frames"])):
            save(frame, folder / f"{t:02d}.png")


def generate(out, seed=0, workers=None, **counts):
    """Write the toy world to `out` (atomically: built beside it, then renamed). Returns its meta
    dict."""
    c = {**DEFAULTS, **{k: v for k, v in counts.items() if v is not None}}
    out = Path(out)
    if out.exists() and not (out / "meta.json").exists():
        raise FileExistsError(f"{out} exists and is not a toy world; choose another --out "
                              "or remove it")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    per_split = {"train": (c["num_images"], c["num_videos"]),
                 "val": (c["num_val_images"], c["num_val_videos"])}
    jobs = []
    for split, (n_images, n_videos) in per_split.items():
        for name in ("images", "segmentation", "edges", "depth", "videos"):
            (tmp / split / name).mkdir(parents=True)
        jobs += [(tmp, seed, split, 0, i, c) for i in range(n_images)]
        jobs += [(tmp, seed, split, 1, i, c) for i in range(n_videos)]
    # items are independent: order does not matter
    with multiprocessing.Pool(workers or os.cpu_count()) as pool:
        for _ in pool.imap_unordered(_write_item, jobs, chunksize=64):
            pass
    meta = dict(toyworld=1, seed=seed, image_size=c["size"], classes=list(CLASSES),
                palette=PALETTE.tolist(), frames_per_video=c["frames"], pan_px_per_frame=PAN,
                splits={s: dict(images=n, videos=v) for s, (n, v) in per_split.items()},
                annotations=["segmentation", "edges", "depth"])
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/toyworld",
                   help="output folder (replaced if it already holds a toy world)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, help="processes (default: all cores)")
    p.add_argument("--size", type=int, help=f"image side in pixels (default {DEFAULTS['size']})")
    for k in ("num_images", "num_val_images", "num_videos", "num_val_videos", "frames"):
        p.add_argument(f"--{k}", type=int,
                       help=f"default {DEFAULTS[k]}" + (" (per video)" if k == "frames" else ""))
    args = p.parse_args(argv)
    if args.size is not None and args.size < 2 * max(SIDES):
        p.error(f"--size must be at least {2 * max(SIDES)} pixels (shapes are up to "
                f"{max(SIDES)} px)")
    t0 = time.time()
    try:
        meta = generate(args.out, args.seed,
                        **{k: v for k, v in vars(args).items() if k not in ("out", "seed")})
    except FileExistsError as e:
        sys.exit(f"error: {e}")
    n = sum(s["images"] * 4 + s["videos"] * meta["frames_per_video"]
            for s in meta["splits"].values())
    print(f"wrote {n} PNGs to {args.out} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
