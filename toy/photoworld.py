"""
The photo world: the paper's data recipe (UVDv1) in miniature, made by algorithms from any folder of
photos, written in exactly the toy world's layout (toy/toyworld.py), so that the rest of the pipeline
(tokenize_data.py toyworld, vqgan_train.py, pretrain.py, finetune.py, evaluate.py) runs on it
unchanged.

    python toy/photoworld.py --out data/photoworld                 # the sample photos of installed packages
    python toy/photoworld.py --photos ~/Pictures --out data/mine   # JPEG / PNG / WebP, nested folders

What is in it (all 32x32 RGB PNG, read by a patch tokenizer as 4x4 cells of 8x8 pixels):
- images: square crops of the photos at many scales (a side of SCALES of the photo's shorter side,
  log-uniform), anywhere in the photo, mirrored half the time, with a mild brightness / contrast /
  saturation jitter: a dozen photos give thousands of distinct pictures (stage 1's single images).
- five "image, annotation" tasks on the same crops, each made by an algorithm as UVDv1's were made by
  models (TASKS: query folder -> answer folder, the toy world's names):
    segmentation/  images/ -> regions of smoothed luminance in 4 fixed bands, drawn in the toy
                   palette (darkest = class 0, black): a stand-in for semantic segmentation that each
                   cell can read from itself
    edges/         images/ -> white where the smoothed luminance's gradient (Sobel) is strong, on
                   black: edge detection (UVDv1: HED / Canny)
    depth/         images/ -> a defocus map: how much fine detail there is around each pixel (local
                   gradient energy, blurred), bright = sharp = "near": a depth stand-in (UVDv1: a
                   monocular depth model), by the defocus cue
    masked/        -> images/: inpainting, the crop with a black 16x16 square (2x2 cells) to fill
    grey/          -> images/: colorization, the crop's luminance
- recoloured/: the segmentation maps in a palette per group of pictures (toyworld's mapping probe).
- videos: a camera moving over a photo in steps the tokenizer can copy: pans of one cell (8 px) per
  frame (horizontal, vertical, diagonal) that turn back at the ends of their range, and zooms that go
  in and out through a few fixed scales around one point (every frame at a scale is the same
  picture, so a zoom repeats itself too). A frame's cells were mostly shown by earlier frames, pixel
  for pixel: what a model can continue by copying, which evaluate.py counts.
- a split by photo: the photos are split before any crop is cut, so no crop of a held-out photo is
  ever in train/ (not even for the tokenizer, which trains on train/). --val_photos DIR takes the
  held-out photos from another folder instead (a test on photos of another source).

Photos are read one at a time (EXIF orientation applied, any mode via images.to_rgb, large JPEGs
decoded at a reduced scale): memory does not grow with the folder. Unreadable files are listed in
meta.json's `skipped` and on stderr, and left out.
"""
import argparse
import hashlib
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from scipy import ndimage

if __package__ in (None, ""):  # run as `python toy/photoworld.py`: import from the repository
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from infra.images import to_rgb
from toy import toyworld

PHOTO_EXTS = (".jpg", ".jpeg", ".png", ".webp")
SIZE, CELL, MASK = 32, 8, 16
DEFAULTS = dict(num_images=10000, num_val_images=200, num_videos=1000, num_val_videos=100,
                frames=20)
SCALES = (1 / 32, 1 / 8)  # crop side as a fraction of the photo's shorter side (log-uniform)
WORK_SIDE = 768  # photos are read with their shorter side at most this (crops are 32 px anyway)
MIN_PHOTOS = 4  # at least 1 held-out photo and 3 to train on
VAL_FRACTION, MAX_VAL_PHOTOS = 0.2, 100
BANDS = (70, 120, 170)  # segmentation: smoothed-luminance thresholds between the 4 classes
EDGE_SIGMA, EDGE_THRESHOLD = 1.5, 50  # Sobel magnitude of luminance smoothed by EDGE_SIGMA px
DEPTH_SCALE = 60.0  # defocus map grey = 255 * (1 - exp(-blurred gradient magnitude / DEPTH_SCALE))
PAN_RANGE = (2, 4)  # the camera glides over 2-4 cells along x and along y
PROMPT_FRAMES = 5  # evaluate.py's video prompt
ZOOM_SHARE, ZOOM_RATIO = 0.2, 1.06  # a fifth of the videos zoom, by 6% a frame
# the sample photos shipped inside Python packages: (package, folder in it, files); read from the
# installed files, no network. motorcycle_left/right are a stereo pair: one photo for the split.
PACKAGE_PHOTOS = (
    ("skimage", "data", ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg",
                         "ihc.png", "motorcycle_left.png", "motorcycle_right.png", "retina.jpg",
                         "rocket.jpg")),
)
TASKS = toyworld.TASKS
FOLDERS = toyworld.FOLDERS
LUMA = np.array([0.299, 0.587, 0.114])


class PhotoError(ValueError):
    """Bad input: one line for the user, nothing written."""


def package_photos(packages=PACKAGE_PHOTOS):
    """Paths of the sample photos of the installed packages (found without importing them)."""
    import importlib.util
    paths = []
    for package, folder, names in packages:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        base = Path(list(spec.submodule_search_locations)[0]) / folder
        paths += [base / n for n in names if (base / n).is_file()]
    return paths


def list_photos(folder):
    """Every JPEG / PNG / WebP file under folder (recursive, sorted)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PhotoError(f"photo folder {str(folder)!r} does not exist" if not folder.exists()
                         else f"{str(folder)!r} is not a folder")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in PHOTO_EXTS and p.is_file())


def open_photo(path, side=WORK_SIDE):
    """float32 [H, W, 3] in 0-255 of a photo: EXIF orientation applied, any mode to RGB, the shorter
    side reduced to at most `side` (JPEGs decoded at a reduced DCT scale first)."""
    with Image.open(path) as img:
        w, h = img.size
        if min(w, h) > side:
            img.draft("RGB", (max(side, round(w * side / min(w, h))),
                              max(side, round(h * side / min(w, h)))))
        img = to_rgb(ImageOps.exif_transpose(img))
        w, h = img.size
        if min(w, h) > side:
            img = img.resize((max(1, round(w * side / min(w, h))),
                              max(1, round(h * side / min(w, h)))), Image.BILINEAR,
                             reducing_gap=2.0)
        if min(img.size) < 1:
            raise OSError("empty image")
        return np.asarray(img, dtype=np.float32)


def _check(path):
    """(path, None) if the photo decodes, else (path, reason)."""
    try:
        open_photo(path, side=64)
        return path, None
    except Exception as e:  # PIL raises many kinds on broken files
        return path, f"{type(e).__name__}: {e}".strip()


def _group(path):
    """Photos of one scene share a group (stereo pairs: NAME_left / NAME_right)."""
    stem = Path(path).stem
    for suffix in ("_left", "_right"):
        if stem.endswith(suffix):
            stem = stem[:-len(suffix)]
    return str(Path(path).parent / stem)


def split_photos(paths, val_fraction=VAL_FRACTION):
    """(train, val) lists of paths: groups ordered by a hash of their name, the first
    round(val_fraction * groups) (at least 1, at most MAX_VAL_PHOTOS) held out."""
    groups = {}
    for p in paths:
        groups.setdefault(_group(p), []).append(p)
    if len(groups) < MIN_PHOTOS:
        raise PhotoError(f"{len(groups)} readable photo{'s' * (len(groups) != 1)}; at least "
                         f"{MIN_PHOTOS} are needed (a split by photo: {MIN_PHOTOS - 1} to train on, "
                         "1 held out; a dozen or more is better)")
    order = sorted(groups, key=lambda g: hashlib.sha1(Path(g).name.encode()).hexdigest())
    n_val = min(MAX_VAL_PHOTOS, max(1, round(val_fraction * len(order))))
    val = [p for g in order[:n_val] for p in groups[g]]
    train = [p for g in order[n_val:] for p in groups[g]]
    return sorted(train), sorted(val)


# -----------------------------------------------------------------------------
# the crops and what the algorithms make of them


class Photo:
    """A photo in memory: its pixels (for shapes) and a PIL image (for resizing crops)."""

    def __init__(self, pixels):
        self.image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        self.shape = pixels.shape


def crop(photo, x, y, side, out=SIZE, flip=False):
    """The square (x, y, side) of a Photo resized to out x out, float [out, out, 3]."""
    a = np.asarray(photo.image.resize((out, out), Image.BILINEAR, box=(x, y, x + side, y + side),
                              reducing_gap=None if side / out < 3 else 2.0), dtype=np.float32)
    return a[:, ::-1] if flip else a


def jitter(rng, image, params=None):
    """Mild saturation, contrast and brightness jitter (hues kept: colorization learns real hues);
    params (from draw_jitter) to apply the same to several pictures."""
    saturation, contrast, brightness = params or draw_jitter(rng)
    lum = image @ LUMA
    mean = lum.mean()
    image = lum[..., None] + (image - lum[..., None]) * saturation
    image = mean + (image - mean) * contrast
    return np.clip(image * brightness, 0, 255)


def draw_jitter(rng):
    return rng.uniform(0.8, 1.25), rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15)


def annotate(image, rng):
    """The five tasks' pictures of one crop (uint8 [32, 32, 3]), each uint8 [32, 32, 3]."""
    lum = image.astype(np.float64) @ LUMA
    smooth = ndimage.gaussian_filter(lum, 1.0, mode="nearest")
    classes = np.digitize(smooth, BANDS)
    sobel = lambda a: np.hypot(ndimage.sobel(a, 0, mode="nearest"), ndimage.sobel(a, 1, mode="nearest"))
    edges = sobel(ndimage.gaussian_filter(lum, EDGE_SIGMA, mode="nearest")) > EDGE_THRESHOLD
    detail = ndimage.gaussian_filter(sobel(lum), 3.0, mode="nearest")
    depth = 255 * (1 - np.exp(-detail / DEPTH_SCALE))
    grey = lambda a: np.repeat(np.round(a).astype(np.uint8)[..., None], 3, axis=2)
    x, y = (int(v) * CELL for v in rng.integers(0, (SIZE - MASK) // CELL + 1, 2))
    masked = image.copy()
    masked[y:y + MASK, x:x + MASK] = 0
    return dict(images=image, segmentation=toyworld.PALETTE[classes].astype(np.uint8),
                edges=grey(edges * 255.0), depth=grey(depth), masked=masked, grey=grey(lum),
                classes=classes)


def random_square(rng, photo, low=SCALES[0], high=SCALES[1], extent=1.0):
    """(x, y, side): a square of side (log-uniform fraction of the shorter side), placed so that a
    square `extent` times as large still fits."""
    H, W = photo.shape[:2]
    short = min(H, W)
    side = short * np.exp(rng.uniform(np.log(low), np.log(high)))
    side = max(side, min(8.0, short / extent))
    room = side * extent
    x = rng.uniform(0, max(W - room, 0))
    y = rng.uniform(0, max(H - room, 0))
    return x, y, side


def make_image(rng, photo, palette=None):
    x, y, side = random_square(rng, photo)
    image = jitter(rng, crop(photo, x, y, side, flip=bool(rng.integers(2))))
    out = annotate(np.round(image).astype(np.uint8), rng)
    classes = out.pop("classes")
    if palette is not None:
        out["recoloured"] = np.concatenate([[[0, 0, 0]], toyworld.MAP_COLOURS[palette]])[classes]
    return {k: v.astype(np.uint8) for k, v in out.items()}


def bounce(n, start, way, frames):
    """Positions in 0..n, one step per frame, turning back at the ends."""
    pos, out = start, []
    for _ in range(frames):
        out.append(pos)
        if not 0 <= pos + way <= n:
            way = -way
        pos += way
    return out


def camera_path(rng, frames):
    """[(x, y)] cell positions of a camera gliding diagonally over a canvas of (nx + 1) x (ny + 1)
    positions, bouncing off its sides (as the toy world's shapes do): every step moves the view by
    one cell along x and y. Drawn until the view never comes back, within PROMPT_FRAMES + 11
    frames, to where it was at the last prompt frame (the camera does not stand still or return,
    so repeating the last frame is never exact); most later frames revisit cells the prompt
    showed."""
    while True:
        nx, ny = (int(v) for v in rng.integers(PAN_RANGE[0], PAN_RANGE[1] + 1, 2))
        xs = bounce(nx, int(rng.integers(nx + 1)), int(rng.choice((-1, 1))), frames)
        ys = bounce(ny, int(rng.integers(ny + 1)), int(rng.choice((-1, 1))), frames)
        path = list(zip(xs, ys))
        last = PROMPT_FRAMES - 1
        if path[last] not in path[last + 1:last + 12]:
            return nx, ny, path


def make_video(rng, photo, frames):
    """uint8 [frames, 32, 32, 3]: a camera gliding over one photo a cell per frame (camera_path), or
    (ZOOM_SHARE of the videos) zooming steadily in or out around one point."""
    flip, params = bool(rng.integers(2)), draw_jitter(rng)
    if rng.uniform() >= ZOOM_SHARE:
        nx, ny, path = camera_path(rng, frames)
        w, h = SIZE + CELL * nx, SIZE + CELL * ny
        x, y, side = random_square(rng, photo, extent=max(w, h) / SIZE)
        region = crop(photo, x, y, side * max(w, h) / SIZE, out=max(w, h), flip=flip)
        region = np.round(jitter(rng, region, params)).astype(np.uint8)
        return np.stack([region[py * CELL:py * CELL + SIZE, px * CELL:px * CELL + SIZE]
                         for px, py in path])
    ratio = ZOOM_RATIO ** (frames - 1)
    x, y, side = random_square(rng, photo, high=SCALES[1] / ratio ** 0.5, extent=ratio)
    cx, cy = x + side * ratio / 2, y + side * ratio / 2
    sides = side * ZOOM_RATIO ** np.arange(frames)
    if rng.integers(2):
        sides = sides[::-1]  # zoom in
    return np.stack([np.round(jitter(rng, crop(photo, cx - s / 2, cy - s / 2, s, flip=flip),
                                     params)).astype(np.uint8) for s in sides])


# -----------------------------------------------------------------------------
# writing the world


def _rng(seed, split, kind, index):
    return np.random.default_rng([seed, toyworld.SPLITS[split], kind, index])


def _write_photo(job):
    """Worker: every item of one photo (images and videos), each from its own generator."""
    tmp, seed, split, path, image_ids, video_ids, frames = job
    save = lambda arr, p: Image.fromarray(arr).save(p, compress_level=1)
    try:
        photo = Photo(open_photo(path))
    except Exception as e:
        return str(path), f"{type(e).__name__}: {e}"
    split_palettes = toyworld.palettes(split)
    for i in image_ids:
        palette = split_palettes[(i // toyworld.GROUP[split]) % len(split_palettes)]
        for name, arr in make_image(_rng(seed, split, 0, i), photo, palette).items():
            save(arr, tmp / split / name / f"{i:05d}.png")
    for i in video_ids:
        folder = tmp / split / "videos" / f"{i:04d}"
        folder.mkdir(parents=True)
        for t, frame in enumerate(make_video(_rng(seed, split, 1, i), photo, frames)):
            save(frame, folder / f"{t:02d}.png")
    return str(path), None


def assign(n_items, n_photos, rng):
    """Item -> photo: every photo gets its share (round robin over a shuffled order)."""
    order = rng.permutation(n_photos)
    return [int(order[i % n_photos]) for i in range(n_items)]


def find_photos(photos=None, val_photos=None, workers=None, log=print):
    """(train paths, val paths, skipped [{path, reason}], source description). Raises PhotoError."""
    if photos is None:
        paths = package_photos()
        source = "sample photos of installed packages (" + ", ".join(
            sorted({Path(p).parent.parent.name + "/" + Path(p).parent.name for p in paths})) + ")"
        if not paths:
            raise PhotoError("no folder given and no package with sample photos is installed "
                             "(pip install scikit-image), or pass --photos DIR")
    else:
        paths, source = list_photos(photos), str(photos)
        if not paths:
            raise PhotoError(f"no photos ({', '.join(PHOTO_EXTS)}) under {str(photos)!r}")
    val_paths = None
    if val_photos is not None:
        val_paths = list_photos(val_photos)
        if not val_paths:
            raise PhotoError(f"no photos ({', '.join(PHOTO_EXTS)}) under {str(val_photos)!r}")
    todo = paths + (val_paths or [])
    with multiprocessing.Pool(max(1, min(workers or os.cpu_count(), len(todo)))) as pool:
        checked = dict(pool.imap(_check, todo, chunksize=8))
    skipped = [dict(path=str(p), reason=r) for p, r in checked.items() if r]
    for s in skipped:
        print(f"skipping unreadable photo {s['path']}: {s['reason']}", file=sys.stderr)
    good = [p for p in paths if not checked[p]]
    if not good:
        raise PhotoError(f"none of the {len(paths)} files under {source} is a readable photo")
    if val_paths is None:
        train, val = split_photos(good)
    else:
        train, val = good, [p for p in val_paths if not checked[p]]
        if not val:
            raise PhotoError(f"none of the files under {str(val_photos)!r} is a readable photo")
    return train, val, skipped, source


def generate(out, photos=None, val_photos=None, seed=0, workers=None, **counts):
    """Write the photo world to `out` (built beside it, then renamed). Returns its meta dict."""
    c = {**DEFAULTS, **{k: v for k, v in counts.items() if v is not None}}
    out = Path(out)
    if out.exists() and not (out / "meta.json").exists():
        raise PhotoError(f"{out} exists and is not a photo world; choose another --out or remove it")
    train, val, skipped, source = find_photos(photos, val_photos, workers)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    per_split = {"train": (train, c["num_images"], c["num_videos"]),
                 "val": (val, c["num_val_images"], c["num_val_videos"])}
    jobs = []
    try:
        for split, (paths, n_images, n_videos) in per_split.items():
            for name in FOLDERS:
                (tmp / split / name).mkdir(parents=True)
            rng = np.random.default_rng([seed, toyworld.SPLITS[split], 7])
            of_image, of_video = assign(n_images, len(paths), rng), assign(n_videos, len(paths), rng)
            items = [([], []) for _ in paths]
            for i, k in enumerate(of_image):
                items[k][0].append(i)
            for i, k in enumerate(of_video):
                items[k][1].append(i)
            jobs += [(tmp, seed, split, path, *items[k], c["frames"])
                     for k, path in enumerate(paths)]
        with multiprocessing.Pool(max(1, min(workers or os.cpu_count(), len(jobs)))) as pool:
            failed = [(p, r) for p, r in pool.imap_unordered(_write_photo, jobs) if r]
        if failed:  # read once, then not: a file changed under us
            raise PhotoError(f"{failed[0][0]} could not be read a second time ({failed[0][1]})")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    meta = dict(photoworld=1, toyworld=2, seed=seed, image_size=SIZE,
                classes=["band 0 (darkest)", "band 1", "band 2", "band 3 (lightest)"],
                palette=toyworld.PALETTE.tolist(), frames_per_video=c["frames"],
                video_step_px=CELL, source=source,
                photos={s: [str(p) for p in v[0]] for s, v in per_split.items()},
                skipped=skipped,
                splits={s: dict(images=n, videos=v, photos=len(p))
                        for s, (p, n, v) in per_split.items()},
                tasks=TASKS,
                mapping=dict(folder="recoloured", colours=toyworld.MAP_COLOURS.tolist(),
                             group=toyworld.GROUP,
                             palettes={s: toyworld.palettes(s).tolist() for s in per_split}),
                recipe=dict(scales=SCALES, bands=BANDS, edge_threshold=EDGE_THRESHOLD,
                            edge_sigma=EDGE_SIGMA, depth_scale=DEPTH_SCALE, pan_range=PAN_RANGE, zoom_share=ZOOM_SHARE,
                            zoom_ratio=ZOOM_RATIO))
    return toyworld.finish(tmp, out, meta)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", help="folder of photos (default: the sample photos of installed "
                                    "packages: scikit-image's colour photos)")
    p.add_argument("--val_photos", help="take the held-out photos from this folder instead of "
                                        "splitting --photos")
    p.add_argument("--out", default="data/photoworld",
                   help="output folder (replaced if it already holds a photo world)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, help="processes (default: all cores)")
    for k in DEFAULTS:
        p.add_argument(f"--{k}", type=int, help=f"default {DEFAULTS[k]}")
    args = p.parse_args(argv)
    for k in ("workers", "frames", *DEFAULTS):
        low = 1 if k in ("workers", "frames") else 0
        if getattr(args, k) is not None and getattr(args, k) < low:
            p.error(f"--{k} must be at least {low}, got {getattr(args, k)}")
    t0 = time.time()
    try:
        meta = generate(args.out, args.photos, args.val_photos, args.seed,
                        **{k: v for k, v in vars(args).items()
                           if k not in ("out", "seed", "photos", "val_photos")})
    except PhotoError as e:
        sys.exit(f"error: {e}")
    s = meta["splits"]
    print(f"photo world in {args.out} from {meta['source']}: {s['train']['photos']} photos to "
          f"train on, {s['val']['photos']} held out, {len(meta['skipped'])} skipped; "
          f"{time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
