"""
Pictures in and out: the one way a file becomes the pixels the tokenizer sees (token files,
sample.py's prompts, evaluate.py's queries, VQ-GAN training all read through read_image), and
pictures back to files (grids, GIFs).

A file becomes uint8 [size, size, 3]: EXIF orientation applied, any mode made RGB with transparency
on white, the shorter side resized to `size`, then the centre square. A picture of at most
MAP_COLOURS colours (a segmentation, edge or palette map) is resized by nearest neighbour, so it
keeps exactly its colours; any other (a photo) is resized smoothly (bilinear, antialiased).
Class-index maps (one channel) are coloured through a palette.
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

# the extensions read as images (a GIF: its first frame) and as videos, by every script
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
VIDEO_EXTS = (".mp4", ".avi", ".webm", ".mkv", ".mov")
MAP_COLOURS = 256  # at most this many colours: a map, resized by nearest neighbour


class Skip(Exception):
    """An input that cannot be used; the message is the reason."""


# -----------------------------------------------------------------------------
# palettes: PALETTES[name][c] is the [r, g, b] of class c; unlabelled pixels are black


def _ade20k_palette():
    # Painter's ADE20K colours: 255 - 42 * (the base-6 digits of the class index)
    i = np.arange(150)
    return (255 - 42 * np.stack([i // 36, (i % 36) // 6, i % 6], 1)).astype(np.uint8)


PALETTES = {
    "ade20k": _ade20k_palette(),
    # trainId order
    "cityscapes": np.array([[128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156],
                            [190, 153, 153], [153, 153, 153], [250, 170, 30], [220, 220, 0],
                            [107, 142, 35], [152, 251, 152], [70, 130, 180], [220, 20, 60],
                            [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100], [0, 80, 100],
                            [0, 0, 230], [119, 11, 32]], dtype=np.uint8),
    # the toy world (toy/toyworld.py): background, square, circle, triangle; flat and far apart
    "toy": np.array([[0, 0, 0], [255, 40, 40], [40, 220, 40], [40, 90, 255]], dtype=np.uint8),
}
# value of class 0 in a class-index PNG: ADE20K stores 0 = unlabeled, class c as c + 1
INDEX_OFFSET = {"ade20k": 1}
# Cityscapes' label id of each trainId (its *_labelIds maps)
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
# one-channel PNG modes, which may hold class indices
INDEX_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")


def load_palette(name_or_file):
    """A palette by name, or a JSON file of [r, g, b] colours (a list, or {"palette": [...]} as a
    toy world's meta.json)."""
    if name_or_file in PALETTES:
        return PALETTES[name_or_file]
    try:
        data = json.loads(Path(name_or_file).read_text())
        pal = np.array(data["palette"] if isinstance(data, dict) else data)
    except (OSError, ValueError, KeyError):
        pal = np.zeros(0)
    if pal.ndim != 2 or pal.shape[1] != 3 or pal.min() < 0 or pal.max() > 255:
        raise ValueError(f"palette {name_or_file!r} is not one of {', '.join(PALETTES)} nor a JSON "
                         "list of [r, g, b]")
    return pal.astype(np.uint8)


def index_lut(palette, offset=0, label_ids=None):
    """[65536, 3] colour of each class-index value: palette[c] at offset + c (or at label_ids[c]),
    black elsewhere."""
    lut = np.zeros((65536, 3), np.uint8)
    where = list(label_ids) if label_ids is not None else slice(offset, offset + len(palette))
    lut[where] = palette
    return lut


def annotation_luts(palette, name=None):
    """The colour tables read_annotation needs for class-index maps of a palette: "index" (offset by
    INDEX_OFFSET[name]) and, for Cityscapes, "label_ids" (its *_labelIds maps)."""
    palette = np.asarray(palette, np.uint8)
    luts = {"index": index_lut(palette, INDEX_OFFSET.get(name, 0))}
    if name == "cityscapes":
        luts["label_ids"] = index_lut(palette, label_ids=CITYSCAPES_LABEL_IDS)
    return luts


# -----------------------------------------------------------------------------
# reading: any file -> uint8 [size, size, 3]


def to_rgb(img):
    """Any PIL mode (grayscale, 16-bit, palette, RGBA, CMYK, ...) -> RGB, transparency composited
    onto white."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        a = np.asarray(img, dtype=np.float64)
        # 16-bit samples
        a = a * 255 if img.mode == "F" and a.max() <= 1 else a / 257 if a.max() > 255 else a
        img = Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    return img.convert("RGB")


def square(img, size, resample=None):
    """Shorter side resized to `size`, then the centre size x size crop. resample: nearest for a map
    (at most MAP_COLOURS colours: no colour that was not there), bilinear for a photo, unless
    given."""
    w, h = img.size
    if (w, h) != (size, size):
        if resample is None:
            resample = Image.NEAREST if img.getcolors(MAP_COLOURS) is not None else Image.BILINEAR
        w, h = max(size, round(w * size / min(w, h))), max(size, round(h * size / min(w, h)))
        img = img.resize((w, h), resample)
    left, top = (w - size) // 2, (h - size) // 2
    return np.array(img.crop((left, top, left + size, top + size)))


def read_image(src, size):
    """uint8 [size, size, 3] of an image file (a path or a file object)."""
    with Image.open(src) as img:
        img.draft(None, (size, size))  # JPEG: decode at the smallest DCT scale that covers size
        return square(to_rgb(ImageOps.exif_transpose(img)), size)


def read_annotation(path, size, luts=None):
    """uint8 [size, size, 3] colour map of an annotation file. With luts (annotation_luts), a
    one-channel PNG is a class-index map coloured through them (Cityscapes' *_labelIds through its
    label-id table); any other file is read as read_image reads it."""
    with Image.open(path) as img:
        if luts and img.mode in INDEX_MODES:
            label_ids = Path(path).stem.endswith("_labelIds") and "label_ids" in luts
            lut = luts["label_ids" if label_ids else "index"]
            index = square(img if img.mode in ("L", "P") else img.convert("I"), size, Image.NEAREST)
            return lut[np.clip(index.astype(np.int64), 0, len(lut) - 1)]
    return read_image(path, size)


def read_video(path, size, stride=1, max_frames=None):
    """Every stride-th frame of a video file (PyAV), at most max_frames, each as read_image reads a
    picture."""
    import av  # an optional dependency: only video files need it
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise Skip("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i % stride == 0:
                    frames.append(square(frame.to_image(), size))
                    if len(frames) == max_frames:
                        break
    except av.error.FFmpegError as e:
        raise Skip(f"unreadable video: {e}") from None
    if not frames:
        raise Skip("no frames could be decoded")
    return frames


def read_frames(sources, size, num_frames=None, stride=1):
    """Frames as uint8 [N, 3, size, size] from image files, one folder of images (sorted by name) or
    one video file; every stride-th frame, at most num_frames of them. FileNotFoundError says what
    could not be read."""
    sources = [Path(s) for s in sources]
    try:
        if len(sources) == 1 and sources[0].suffix.lower() in VIDEO_EXTS and sources[0].is_file():
            needed = None if num_frames is None else (num_frames - 1) * stride + 1
            frames = read_video(sources[0], size, 1, needed)
        else:
            if len(sources) == 1 and sources[0].is_dir():
                sources = sorted(p for p in sources[0].iterdir() if p.suffix.lower() in IMAGE_EXTS)
            frames = [read_image(p, size) for p in sources]
    except (Skip, OSError) as e:
        raise FileNotFoundError(f"cannot read {' '.join(map(str, sources))} ({e}); pass image "
                                "files, a folder of frames or a video file") from None
    frames = frames[::stride][:num_frames]
    if not frames:
        raise FileNotFoundError("no frames found in "
                                f"{' '.join(map(str, sources)) or 'an empty folder'}")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


def load_image(path, size):
    """An image file as uint8 [3, size, size] (read_image's pixels, channels first)."""
    try:
        return torch.from_numpy(read_image(path, size)).permute(2, 0, 1).contiguous()
    except OSError as e:
        raise FileNotFoundError(f"cannot read image {str(path)!r} ({e}); pass PNG/JPEG "
                                "files") from None


def load_images(folder, size):
    """Every image under folder (recursive) as uint8 [N, 3, size, size] in memory; unreadable files
    are skipped with a line on stderr."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist; pass a directory "
                                "of images")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) found under {str(folder)!r}")
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    n = 0
    quiet = len(paths) < 2000 or not sys.stderr.isatty()
    for p in tqdm(paths, desc=f"loading {folder}", leave=False, disable=quiet):
        try:
            out[n] = read_image(p, size)
        except OSError as e:
            print(f"skipping unreadable image {p}: {e}", file=sys.stderr)
            continue
        n += 1
    return torch.from_numpy(out[:n]).permute(0, 3, 1, 2).contiguous()


# -----------------------------------------------------------------------------
# writing


def to_uint8(image):
    """[3, H, W] uint8 or float in [0, 1] -> numpy uint8 [H, W, 3]."""
    if image.is_floating_point():
        image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return image.permute(1, 2, 0).cpu().numpy()


def save_grid(rows, path, gap=2, min_size=128):
    """Write a PNG grid: rows is a list of rows, each a list of images [3, H, W] (uint8, or float in
    [0, 1]; all of one size) or None for a blank cell. Small images are scaled up (nearest) to at
    least min_size pixels."""
    cells = [im for row in rows for im in row if im is not None]
    if not cells:
        raise ValueError("save_grid got no images")
    H, W = cells[0].shape[-2:]
    ncol = max(len(row) for row in rows)
    canvas = np.full((len(rows) * (H + gap) - gap, ncol * (W + gap) - gap, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            if image is not None:
                top, left = r * (H + gap), c * (W + gap)
                canvas[top:top + H, left:left + W] = to_uint8(image)
    grid = Image.fromarray(canvas)
    scale = max(1, math.ceil(min_size / H))
    grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).save(path)


def save_gif(frames, path, fps=4, min_size=128):
    """Write frames [N, 3, H, W] (uint8 or float in [0, 1]) as a looping GIF, small frames scaled
    up."""
    scale = max(1, math.ceil(min_size / frames.shape[-2]))
    images = [Image.fromarray(to_uint8(f)) for f in frames]
    images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps),
                   loop=0)


def save_plot(x_labels, series, path, xlabel, width=420, height=260, y_range=(0, 100), unit="%",
              title=""):
    """A small line plot (PIL only): series maps a label to one value per x label (None: no point),
    each line in its own colour, on the y axis y_range (in `unit`). Returns the path as a string."""
    from PIL import ImageDraw
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    # the legend: labels one after another, wrapped to the width, above the plot
    legend, x, y = [], 50, 4 + 14 * bool(title)
    for label in series:
        w = draw.textlength(label) + 16
        if x + w > width and x > 50:
            x, y = 50, y + 14
        legend.append((x, y))
        x += w
    left, right, top, bottom = 46, width - 12, y + 22, height - 38
    low, high = y_range
    x_of = lambda i: left + (right - left) * i / max(1, len(x_labels) - 1)
    y_of = lambda v: bottom - (bottom - top) * (v - low) / (high - low)
    for k in range(6):
        v = low + (high - low) * k / 5
        draw.line([(left, y_of(v)), (right, y_of(v))], fill=(225, 225, 225))
        digits = 0 if high - low >= 10 else 1 if high - low >= 1 else 2 if high - low >= 0.1 else 3
        draw.text((left - 40, y_of(v) - 6), f"{v:.{digits}f}{unit}", fill="black")
    for i, label in enumerate(x_labels):  # kept inside the picture: the last one ends at the edge
        x = min(x_of(i) - 3, width - 4 - draw.textlength(str(label)))
        draw.text((x, bottom + 6), str(label), fill="black")
    draw.text(((left + right) // 2 - 40, height - 18), xlabel, fill="black")
    if title:
        draw.text((left, 4), title, fill="black")
    colours = [(40, 90, 255), (215, 45, 45), (40, 160, 60), (150, 60, 200), (120, 120, 120)]
    for n, (label, values) in enumerate(series.items()):
        colour = colours[n % len(colours)]
        points = [(x_of(i), y_of(min(max(v, low), high))) for i, v in enumerate(values)
                  if v is not None]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.text(legend[n], label, fill=colour)
    image.save(path)
    return str(path)


def save_panels(paths, path, columns=None):
    """Paste PNGs (plots) into one picture, `columns` per row (default: all in one row). Returns the
    path as a string."""
    panels = [Image.open(p).convert("RGB") for p in paths]
    columns = columns or len(panels)
    width, height = max(p.width for p in panels), max(p.height for p in panels)
    rows = math.ceil(len(panels) / columns)
    canvas = Image.new("RGB", (columns * width, rows * height), "white")
    for k, panel in enumerate(panels):
        canvas.paste(panel, (k % columns * width, k // columns * height))
    canvas.save(path)
    return str(path)
