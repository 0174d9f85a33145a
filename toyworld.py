"""
The toy world: a tiny procedurally generated visual world in which every task of the paper exists in miniature,
so that the whole method (VQ-GAN, single-image pre-training, sequence fine-tuning, in-context evaluation) can be
trained and checked on a CPU in minutes. It is to LVM-Lite what shakespeare_char is to nanoGPT.

    python toyworld.py --out data/toyworld --seed 0          # 33,000 small PNGs, deterministic given --seed

What is in it (all 32x32 RGB PNG):
- images: 1-3 shapes (square, circle, triangle) of random colour and size on a varied simple background (solid,
  gradient or faint stripes). The class is the shape, never its colour: colours are random per shape.
- three annotations per image, same file stem:
    segmentation/  flat class colours in the fixed PALETTE (background black), the answer to "image -> segmentation"
    edges/         white object boundaries on black
    depth/         depth-like order on a ground plane: lower in the picture = nearer = brighter and drawn on top, so
                   both the occlusion and the grey level follow from what the image shows
- videos: frame folders of shapes moving with constant integer velocity (4-7 px per frame, at least one 4-px token
  cell of a f=4 tokenizer) and bouncing elastically off the borders, so repeating the last frame predicts badly
  while the next frame follows exactly from the previous two.
- a held-out split: val/ is drawn from its own random streams, so its pictures are not those of train/.

Layout, readable by tokenize_data.py's generic commands (image folder, frame folders, pairs matched by stem):
    OUT/meta.json                                 classes, palette (also a palette file for --palette), counts
    OUT/{train,val}/images/00000.png
    OUT/{train,val}/{segmentation,edges,depth}/00000.png
    OUT/{train,val}/videos/0000/00.png ... 19.png
Every item is drawn from its own generator seeded by (seed, split, kind, index), so item i does not depend on how
many items are asked for.
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

CLASSES = ("background", "square", "circle", "triangle")
# segmentation colours, index = class; flat and far apart so a nearest-colour read-out of a decoded map is easy
PALETTE = np.array([[0, 0, 0], [255, 40, 40], [40, 220, 40], [40, 90, 255]], dtype=np.uint8)
SPLITS = {"train": 0, "val": 1}
DEFAULTS = dict(size=32, num_images=6000, num_val_images=600, num_videos=300, num_val_videos=30, frames=20)
MIN_SIDE, MAX_SIDE = 9, 15  # shape sizes in pixels: 2-4 token cells of a f=4 tokenizer
MIN_SPEED, MAX_SPEED = 4.0, 7.0  # pixels per frame
DEPTH_NEAR, DEPTH_FAR = 255, 80  # depth grey = FAR + (NEAR - FAR) * (shape's bottom edge) / size
COLOUR_MIN_DISTANCE = 110  # RGB distance of a shape's colour from the background (and 70 from other shapes)


def shape_mask(cls, x, y, side, size):
    """Boolean [size, size] mask of shape `cls` with its bounding box's top-left corner at (x, y)."""
    centres = np.arange(size) + 0.5
    u, v = (centres[None, :] - x) / side, (centres[:, None] - y) / side  # [0, 1) inside the bounding box
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    if CLASSES[cls] == "circle":
        return inside & ((u - 0.5) ** 2 + (v - 0.5) ** 2 < 0.25)
    if CLASSES[cls] == "triangle":  # apex up
        return inside & (np.abs(u - 0.5) <= v / 2)
    return inside


def background(rng, size):
    """Float [size, size, 3]: a solid colour, a linear gradient of random direction, or faint stripes."""
    c1 = rng.integers(0, 256, 3).astype(np.float64)
    kind = rng.integers(3)
    if kind == 0:
        return np.broadcast_to(c1, (size, size, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    if kind == 1:
        c2 = np.clip(c1 + rng.integers(-90, 91, 3), 0, 255)
        a = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(a) + yy * np.sin(a)
        t = (t - t.min()) / (t.max() - t.min())
        return c1 + t[..., None] * (c2 - c1)
    c2 = np.clip(c1 + rng.integers(-40, 41, 3), 0, 255)
    period = rng.integers(4, 9)
    axis = (xx, yy, xx + yy)[rng.integers(3)] * (size - 1)
    return np.where(((axis // period) % 2 == 0)[..., None], c1, c2)


def shape_colour(rng, bg_mean, others):
    """A random colour far from the background and from the other shapes' colours (best of 100 tries)."""
    best, best_score = None, -1.0
    for _ in range(100):
        c = rng.integers(0, 256, 3)
        score = min([np.linalg.norm(c - bg_mean) / COLOUR_MIN_DISTANCE] +
                    [np.linalg.norm(c - o) / 70 for o in others])
        if score >= 1:
            return c
        if score > best_score:
            best, best_score = c, score
    return best


def render(bg, shapes, size):
    """Draw shapes far-to-near: (image uint8 [H, W, 3], class map, instance map (0 = background), depth grey).
    shapes: list of dicts with cls, x, y, side, colour. Nearer = lower bottom edge (a ground plane)."""
    image = bg.copy()
    classes = np.zeros((size, size), np.uint8)
    instances = np.zeros((size, size), np.uint8)
    depth = np.zeros((size, size), np.uint8)
    for k, s in enumerate(sorted(shapes, key=lambda s: s["y"] + s["side"]), start=1):
        m = shape_mask(s["cls"], s["x"], s["y"], s["side"], size)
        image[m] = s["colour"]
        classes[m], instances[m] = s["cls"], k
        depth[m] = round(DEPTH_FAR + (DEPTH_NEAR - DEPTH_FAR) * (s["y"] + s["side"]) / size)
    return np.round(image).astype(np.uint8), classes, instances, depth


def edges(instances):
    """White where a pixel's object differs from a 4-neighbour's (both sides of each boundary: 2 px lines); the
    picture's border counts as background, so every outline is closed."""
    p = np.pad(instances, 1)
    c = p[1:-1, 1:-1]
    return (c != p[:-2, 1:-1]) | (c != p[2:, 1:-1]) | (c != p[1:-1, :-2]) | (c != p[1:-1, 2:])


def sample_shapes(rng, bg, size, max_overlap=0.25):
    """1-3 shapes fully inside the picture; each overlaps the others' boxes by at most max_overlap of its box
    (the last of 30 tries otherwise)."""
    shapes = []
    for _ in range(rng.integers(1, 4)):
        for _ in range(30):
            side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
            x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
            overlap = max([_box_overlap((x, y, side), (s["x"], s["y"], s["side"])) for s in shapes], default=0)
            if overlap <= max_overlap:
                break
        cls = int(rng.integers(1, len(CLASSES)))
        colour = shape_colour(rng, bg[y:y + side, x:x + side].reshape(-1, 3).mean(0), [s["colour"] for s in shapes])
        shapes.append(dict(cls=cls, x=x, y=y, side=side, colour=colour))
    return shapes


def _box_overlap(a, b):
    """Fraction of box a (x, y, side) covered by box b."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[2], b[1] + b[2]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0) / a[2] ** 2


def make_image(rng, size):
    """One picture with its three annotations, each uint8 [H, W, 3]."""
    bg = background(rng, size)
    image, classes, instances, depth = render(bg, sample_shapes(rng, bg, size), size)
    grey = lambda a: np.repeat(a[..., None], 3, axis=2)
    return dict(images=image, segmentation=PALETTE[classes], edges=grey(edges(instances).astype(np.uint8) * 255),
                depth=grey(depth))


def bounce(p0, v, t, span):
    """Position at frame t of a point moving at v per frame inside [0, span], reflecting elastically at the ends
    (a triangle wave: the speed is constant, only the direction flips)."""
    if span == 0:
        return 0
    q = (p0 + v * t) % (2 * span)
    return q if q <= span else 2 * span - q


def velocity(rng):
    """Integer (vx, vy) pixels per frame, so every frame is pixel-exact, with speed in [MIN_SPEED, MAX_SPEED]."""
    while True:
        v = rng.integers(-int(MAX_SPEED), int(MAX_SPEED) + 1, 2)
        if MIN_SPEED <= np.hypot(*v) <= MAX_SPEED:
            return v


def make_video(rng, size, frames):
    """uint8 [frames, H, W, 3]: a fixed background, 1-3 shapes moving with constant velocity and bouncing."""
    bg = background(rng, size)
    shapes = sample_shapes(rng, bg, size, max_overlap=1.0)  # moving shapes cross anyway
    for s in shapes:
        s["v"] = velocity(rng)
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        moved = [dict(s, x=bounce(s["x"], s["v"][0], t, size - s["side"]),
                      y=bounce(s["y"], s["v"][1], t, size - s["side"])) for s in shapes]
        out[t] = render(bg, moved, size)[0]
    return out


def _rng(seed, split, kind, index):
    return np.random.default_rng([seed, SPLITS[split], kind, index])


def _write_item(job):
    """Worker: draw and save item `index` of `split` (kind 0: an image and its annotations, 1: a video)."""
    tmp, seed, split, kind, index, c = job
    save = lambda arr, path: Image.fromarray(arr).save(path, compress_level=1)  # fast zlib; PNG stays lossless
    if kind == 0:
        for name, arr in make_image(_rng(seed, split, 0, index), c["size"]).items():
            save(arr, tmp / split / name / f"{index:05d}.png")
    else:
        folder = tmp / split / "videos" / f"{index:04d}"
        folder.mkdir(parents=True)
        for t, frame in enumerate(make_video(_rng(seed, split, 1, index), c["size"], c["frames"])):
            save(frame, folder / f"{t:02d}.png")


def generate(out, seed=0, workers=None, **counts):
    """Write the toy world to `out` (atomically: built beside it, then renamed). Returns its meta dict."""
    c = {**DEFAULTS, **{k: v for k, v in counts.items() if v is not None}}
    out = Path(out)
    if out.exists() and not (out / "meta.json").exists():
        raise FileExistsError(f"{out} exists and is not a toy world; choose another --out or remove it")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    per_split = {"train": (c["num_images"], c["num_videos"]), "val": (c["num_val_images"], c["num_val_videos"])}
    jobs = []
    for split, (n_images, n_videos) in per_split.items():
        for name in ("images", "segmentation", "edges", "depth", "videos"):
            (tmp / split / name).mkdir(parents=True)
        jobs += [(tmp, seed, split, 0, i, c) for i in range(n_images)]
        jobs += [(tmp, seed, split, 1, i, c) for i in range(n_videos)]
    with multiprocessing.Pool(workers or os.cpu_count()) as pool:  # items are independent: order does not matter
        for _ in pool.imap_unordered(_write_item, jobs, chunksize=64):
            pass
    meta = dict(toyworld=1, seed=seed, image_size=c["size"], classes=list(CLASSES), palette=PALETTE.tolist(),
                frames_per_video=c["frames"], speed_px_per_frame=[MIN_SPEED, MAX_SPEED],
                splits={s: dict(images=n, videos=v) for s, (n, v) in per_split.items()},
                annotations=["segmentation", "edges", "depth"])
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/toyworld", help="output folder (replaced if it already holds a toy world)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, help="processes (default: all cores)")
    p.add_argument("--size", type=int, help=f"image side in pixels (default {DEFAULTS['size']})")
    for k in ("num_images", "num_val_images", "num_videos", "num_val_videos", "frames"):
        p.add_argument(f"--{k}", type=int, help=f"default {DEFAULTS[k]}" + (" (per video)" if k == "frames" else ""))
    args = p.parse_args(argv)
    if args.size is not None and args.size < 2 * MAX_SIDE:
        p.error(f"--size must be at least {2 * MAX_SIDE} pixels (shapes are up to {MAX_SIDE} px)")
    t0 = time.time()
    try:
        meta = generate(args.out, args.seed, **{k: v for k, v in vars(args).items() if k not in ("out", "seed")})
    except FileExistsError as e:
        sys.exit(f"error: {e}")
    n = sum(s["images"] * 4 + s["videos"] * meta["frames_per_video"] for s in meta["splits"].values())
    print(f"wrote {n} PNGs to {args.out} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
