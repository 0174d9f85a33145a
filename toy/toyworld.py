"""
The toy world: a tiny procedurally generated visual world in which every task of the paper exists in
miniature, so that the whole method (VQ-GAN, single-image pre-training, sequence fine-tuning,
in-context evaluation) can be trained and checked on a CPU in minutes. It is to LVM-Lite what
shakespeare_char is to nanoGPT.

    python toy/toyworld.py --out data/toyworld --seed 0  # small PNGs, deterministic given --seed

What is in it (all 32x32 RGB PNG; a toy tokenizer reads it as 4x4 cells of 8x8 pixels, one token
each):
- images: 1-3 shapes (square, circle, triangle) of 8, 12 or 16 px on a grey background, flat
  or with a gentle ramp. Positions and sizes sit on a 4-px grid. The class decides the hue (squares
  red, circles green, triangles blue, each jittered), so what a cell shows says which class it
  holds: each answer token of a task follows from the query at and near the same place, and the
  prompt decides which mapping applies.
- five tasks on the same pictures, same file stem (TASKS: query folder -> answer folder):
    segmentation/  images/ -> flat class colours in the fixed PALETTE (background black)
    edges/         images/ -> white object boundaries on black
    depth/         images/ -> depth-like order on a ground plane: lower in the picture = nearer =
                   brighter and drawn on top
    masked/        -> images/: inpainting, the picture with a black 16x16 square (2x2 cells) to fill
    grey/          -> images/: colorization, the picture's luminance
- recoloured/: the segmentation maps again, but each group of GROUP[split] consecutive pictures has
  a class -> colour palette of its own, drawn from MAP_COLOURS; the palettes of val/ are never used
  in train/. A prompt of pairs from one group shows its palette; nothing else does (the probe of
  in-context learning of a mapping no training sequence showed).
- videos: frame folders of two shapes (of 1 and 2x2 cells) sliding over a still flat background by
  one token cell (8 px) per frame, bouncing off the picture's edges. Nearly every cell of a frame
  is a cell of the frames before it, moved whole (background stays, shapes move): what a model can
  continue by copying, which the evaluation counts. (A camera panning half a cell per frame, this
  world's first video, never repeats a token: the model could only blur.) The motion repeats every
  12 frames, so a frame 12 after another equals it.
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
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

if __package__ in (None, ""):  # run as `python toy/toyworld.py`: import from the repository
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from infra.images import PALETTES

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
# jittered by +-COLOUR_JITTER, so what a token shows says its class. The hues also differ in
# brightness (luminance about 100, 128 and 61), all darker than any background (BACKGROUND grey
# levels, a ramp of up to RAMP more or less), so a grey picture still shows every shape and says its
# class; and backgrounds are pure greys (a tint of at most +-TINT per channel: none), so a grey
# picture's background is the colour picture's. Colorization has the shapes to colour, nothing
# unknowable.
CLASS_COLOURS = np.array([[0, 0, 0], [220, 50, 40], [40, 190, 40], [30, 50, 200]])
COLOUR_JITTER, TINT = 15, 0
BACKGROUND, RAMP = (175, 230), 25
STEP = 8  # video: shapes move one token cell per frame, on the cell grid, sides of 1 or 2 cells
MASK = 16  # inpainting: the side of the black square to fill, on the cell grid
# the mapping probe: a palette (three distinct colours for square, circle, triangle; background
# black) per group of pictures, from colours the toy tokenizer reproduces well. Of the 120 palettes,
# HELD_OUT (drawn by a fixed generator) colour only val/.
MAP_COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [150, 150, 150],
                        [90, 90, 90]])
HELD_OUT = 24
GROUP = {"train": 50, "val": 8}  # pictures per palette group
TASKS = {"segmentation": ("images", "segmentation"), "edges": ("images", "edges"),
         "depth": ("images", "depth"), "inpainting": ("masked", "images"),
         "colorization": ("grey", "images")}
DEPTH_NEAR, DEPTH_FAR = 255, 80  # depth grey = FAR + (NEAR - FAR) * (shape's bottom edge) / size
FOLDERS = ("images", "segmentation", "edges", "depth", "masked", "grey", "recoloured", "videos")


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
    """Float [H, W, 3] (size = H = W, or (H, W)): a grey (tinted by up to TINT), plus a linear ramp
    of `ramp` grey levels across the picture in a random direction (None: a ramp of up to RAMP
    levels or none, evenly)."""
    height, width = (size, size) if np.isscalar(size) else size
    c1 = rng.uniform(*BACKGROUND) + rng.uniform(-TINT, TINT, 3)
    if ramp is None:
        ramp = rng.uniform(-RAMP, RAMP) if rng.integers(2) else 0.0
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


def palettes(split):
    """[n, 3] indices into MAP_COLOURS: the palettes of a split (train: 96, val: the HELD_OUT)."""
    every = np.array([p for p in itertools.permutations(range(len(MAP_COLOURS)), 3)])
    order = np.random.default_rng(2024).permutation(len(every))
    return every[order[HELD_OUT:] if split == "train" else order[:HELD_OUT]]


def make_image(rng, size, palette=None):
    """One picture with its task pictures, each uint8 [H, W, 3]; `recoloured` (the segmentation in
    palette: [3] indices into MAP_COLOURS) when a palette is given."""
    bg = background(rng, size)
    image, classes, instances, depth = render(bg, sample_shapes(rng, size))
    grey = lambda a: np.repeat(a[..., None], 3, axis=2)
    x, y = (int(v) * 8 for v in rng.integers(0, (size - MASK) // 8 + 1, 2))
    masked = image.copy()
    masked[y:y + MASK, x:x + MASK] = 0
    luminance = np.round(image @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    out = dict(images=image, segmentation=PALETTE[classes],
               edges=grey(edges(instances).astype(np.uint8) * 255), depth=grey(depth),
               masked=masked, grey=grey(luminance))
    if palette is not None:
        out["recoloured"] = np.concatenate([[[0, 0, 0]], MAP_COLOURS[palette]])[classes]
    return {k: v.astype(np.uint8) for k, v in out.items()}


def make_video(rng, size, frames):
    """uint8 [frames, H, W, 3]: two shapes, one of one cell and one of 2x2 cells, slide over a
    still, flat background by STEP px (one token cell) per frame along x, y or a diagonal, each
    bouncing off the picture's edges."""
    bg = background(rng, size, ramp=0)  # flat: the shapes are what moves and what to follow
    velocities = [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy]
    shapes = []
    for side in (STEP, 2 * STEP):
        x, y = (int(v) * STEP for v in rng.integers(0, (size - side) // STEP + 1, 2))
        dx, dy = velocities[rng.integers(len(velocities))]
        cls = int(rng.integers(1, len(CLASSES)))
        shapes.append(dict(cls=cls, x=x, y=y, side=side, colour=shape_colour(rng, cls),
                           v=[dx * STEP, dy * STEP]))
    video = []
    for _ in range(frames):
        video.append(render(bg, shapes)[0])
        for s in shapes:  # move; a step that would leave the picture reverses that axis first
            for axis, key in enumerate(("x", "y")):
                if not 0 <= s[key] + s["v"][axis] <= size - s["side"]:
                    s["v"][axis] *= -1
                s[key] += s["v"][axis]
    return np.stack(video)


def _rng(seed, split, kind, index):
    return np.random.default_rng([seed, SPLITS[split], kind, index])


def _write_item(job):
    """Worker: draw and save item `index` of `split` (kind 0: an image and its annotations, 1: a
    video)."""
    tmp, seed, split, kind, index, c = job
    # fast zlib; PNG stays lossless
    save = lambda arr, path: Image.fromarray(arr).save(path, compress_level=1)
    if kind == 0:
        split_palettes = palettes(split)
        palette = split_palettes[(index // GROUP[split]) % len(split_palettes)]
        for name, arr in make_image(_rng(seed, split, 0, index), c["size"], palette).items():
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
        for name in FOLDERS:
            (tmp / split / name).mkdir(parents=True)
        jobs += [(tmp, seed, split, 0, i, c) for i in range(n_images)]
        jobs += [(tmp, seed, split, 1, i, c) for i in range(n_videos)]
    # items are independent: order does not matter
    with multiprocessing.Pool(workers or os.cpu_count()) as pool:
        for _ in pool.imap_unordered(_write_item, jobs, chunksize=64):
            pass
    meta = dict(toyworld=2, seed=seed, image_size=c["size"], classes=list(CLASSES),
                palette=PALETTE.tolist(), frames_per_video=c["frames"], video_step_px=STEP,
                splits={s: dict(images=n, videos=v) for s, (n, v) in per_split.items()},
                tasks=TASKS,
                mapping=dict(folder="recoloured", colours=MAP_COLOURS.tolist(), group=GROUP,
                             palettes={s: palettes(s).tolist() for s in per_split}))
    return finish(tmp, out, meta)


def finish(tmp, out, meta):
    """Write meta.json into the finished folder tmp, then put it in out's place in one rename: an
    interrupted run never leaves a half world at out. Returns meta."""
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
    least = dict(workers=1, frames=1, num_images=0, num_val_images=0, num_videos=0,
                 num_val_videos=0)
    for k, low in least.items():
        if getattr(args, k) is not None and getattr(args, k) < low:
            p.error(f"--{k} must be at least {low}, got {getattr(args, k)}")
    if args.size is not None and args.size < 2 * max(SIDES):
        p.error(f"--size must be at least {2 * max(SIDES)} pixels (shapes are up to "
                f"{max(SIDES)} px)")
    t0 = time.time()
    try:
        meta = generate(args.out, args.seed,
                        **{k: v for k, v in vars(args).items() if k not in ("out", "seed")})
    except FileExistsError as e:
        sys.exit(f"error: {e}")
    n = sum(s["images"] * (len(FOLDERS) - 1) + s["videos"] * meta["frames_per_video"]
            for s in meta["splits"].values())
    print(f"wrote {n} PNGs to {args.out} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
