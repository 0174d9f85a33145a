"""
Pre-tokenize images, videos and annotated pairs with a VQ-GAN into token files
(NAME.tokens + NAME.json, the format data.py documents and reads; training builds its sequences from
them with data.SEQUENCE_BUILDERS).

  python tokenize_data.py images --input DIR_OR_TAR [...] --vqgan CKPT --out data/tokens \\
      --name datacomp
  python tokenize_data.py video --input DIR_OR_VIDEO [...] --stride 2 --vqgan CKPT \\
      --out data/tokens --name ucf101
  python tokenize_data.py pairs --images ADEChallengeData2016/images/training --palette ade20k \\
      --annotations ADEChallengeData2016/annotations/training --vqgan CKPT --name ade20k_train
  python tokenize_data.py pairs --images cityscapes/leftImg8bit/train --palette cityscapes \\
      --annotations cityscapes/gtFine/train --vqgan CKPT --name cityscapes_train
  # after runs with --num_shards K --shard_id i
  python tokenize_data.py merge --out data/tokens --name datacomp
The toy world (toy/toyworld.py), end to end on a CPU, and a picture of its sequences decoded from
the tokens:
  python toy/toyworld.py --out data/toyworld --seed 0
  python tools/vqgan_train.py --data data/toyworld/train --val_data data/toyworld/val \\
      --config toy --out_dir out/vqgan_toy
  python tokenize_data.py toyworld --root data/toyworld --vqgan out/vqgan_toy --out data/toy_tokens
    -> data/toy_tokens/{train,val}_{images,video,segmentation,edges,depth}.{tokens,json}
  python tokenize_data.py show --data data/toy_tokens --names 'train_*' --vqgan out/vqgan_toy \\
      --out docs/toy_sequences.png

Inputs: image folders (recursive; jpg png webp bmp tiff gif) and img2dataset .tar shards; video
files (PyAV) and frame folders; image + annotation folders matched by stem, annotations as colour
maps or class-index PNGs (--palette). An unreadable input is listed in `skipped` with its reason,
never fatal. Work is committed block by block: the same command rerun after a kill resumes and
writes the bytes of an uninterrupted run; finished files appear atomically.
"""
import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from data import SEQUENCE_BUILDERS, load_tokens, random_sequence
from infra.images import (IMAGE_EXTS, INDEX_MODES, PALETTES, VIDEO_EXTS, Skip, annotation_luts,
                    load_palette, read_annotation, read_image, read_video)

IMAGE_SUFFIXES = ("_leftImg8bit",)  # dropped from stems before matching (Cityscapes)
# most preferred first
ANNOTATION_SUFFIXES = ("_gtFine_labelTrainIds", "_gtFine_labelIds", "_gtFine_color")

# -----------------------------------------------------------------------------
# inputs -> units, in a fixed order. A unit is one source of rows: ("image", path),
# ("tar", shard, member, offset, size), ("video", path), ("frames", folder, names),
# ("pair", image, annotation), or ("skip", path, reason). Pixels come from infra/images.py, the
# reader every script shares.


def natural_key(s):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(s))]


def walk(path):
    """(folder, file names) of a file, or of a folder and every folder below it, in natural order
    (2 < 10)."""
    if not os.path.exists(path):
        raise ValueError(f"input {path!r} does not exist")
    if not os.path.isdir(path):
        return [(os.path.dirname(path), [os.path.basename(path)])]
    tree = sorted(os.walk(path), key=lambda w: natural_key(w[0]))
    return [(folder, sorted(files, key=natural_key)) for folder, _, files in tree]


def _files(inputs):
    return [os.path.join(d, f) for inp in inputs for d, files in walk(inp) for f in files]


def _not_image(path, expected="images"):
    return ("skip", path, f"not one of the {expected} ({Path(path).suffix or 'no extension'})")


def list_tar(path):
    """Image members of a plain webdataset shard, addressed by byte offset (other members are their
    captions)."""
    units = []
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.isfile() and Path(m.name).suffix.lower() in IMAGE_EXTS:
                    units.append(("tar", path, m.name, m.offset_data, m.size))
    except (tarfile.TarError, OSError) as e:
        units.append(("skip", path,
                      f"unreadable tar after {len(units)} images: {type(e).__name__}: {e}"))
    return units


def list_images(inputs):
    units = []
    for f in _files(inputs):
        ext = Path(f).suffix.lower()
        units += ([("image", f)] if ext in IMAGE_EXTS else list_tar(f) if ext == ".tar"
                  else [_not_image(f)])
    return units


def list_videos(inputs):
    """Video files, and every folder that holds image files (a video as frames)."""
    units = []
    for folder, files in (w for inp in inputs for w in walk(inp)):
        frames = [f for f in files if Path(f).suffix.lower() in IMAGE_EXTS]
        units += [("frames", folder, frames)] if frames else []
        for f in (os.path.join(folder, f) for f in files
                  if Path(f).suffix.lower() not in IMAGE_EXTS):
            units.append(("video", f) if Path(f).suffix.lower() in VIDEO_EXTS
                         else _not_image(f, "videos or frames"))
    if any(u[0] == "video" for u in units):
        try:
            import av  # noqa: F401
        except ImportError:
            raise ValueError("reading video files needs PyAV: `pip install av` (or give folders of "
                             "frames instead)")
    return units


def _stem_key(path, suffixes):
    """(matching key, preference) of a file: its stem without a known dataset suffix."""
    stem = Path(path).stem
    for rank, suffix in enumerate(suffixes):
        if stem.endswith(suffix):
            return stem[:-len(suffix)], rank
    return stem, -1


def list_pairs(images_dir, annotations_dir):
    """("pair", image, annotation) per image whose stem has an annotation; the others as skips."""
    annotations = {}
    for f in _files([annotations_dir]):
        if Path(f).suffix.lower() in IMAGE_EXTS:
            key, rank = _stem_key(f, ANNOTATION_SUFFIXES)
            if key not in annotations or rank < annotations[key][0]:
                annotations[key] = (rank, f)
    units, seen = [], set()
    for f in _files([images_dir]):
        key = _stem_key(f, IMAGE_SUFFIXES)[0]
        if Path(f).suffix.lower() not in IMAGE_EXTS:
            units.append(_not_image(f))
        elif key in seen:
            units.append(("skip", f, f"another image has the stem {key!r}"))
        elif key not in annotations:
            units.append(("skip", f, f"no annotation with the stem {key!r} in {annotations_dir}"))
        else:
            units.append(("pair", f, annotations[key][1]))
        seen.add(key)
    return units


def load_unit(unit, opts, luts=None):
    """The rows (uint8 [size, size, 3] each) of one unit; raises for an unusable input."""
    kind, path, size = unit[0], unit[1], opts["size"]
    if kind == "skip":
        raise Skip(unit[2])
    if kind == "image":
        return [read_image(path, size)]
    if kind == "tar":
        with open(path, "rb") as f:
            f.seek(unit[3])
            return [read_image(io.BytesIO(f.read(unit[4])), size)]
    if kind == "pair":
        return [read_image(path, size), read_annotation(unit[2], size, luts)]
    if kind == "video":
        return read_video(path, size, opts["stride"], opts["max_frames"])
    rows = []
    # frames: one bad frame spoils the video
    for name in unit[2][::opts["stride"]][:opts["max_frames"]]:
        try:
            rows.append(read_image(os.path.join(path, name), size))
        except Exception as e:
            raise Skip(f"frame {name}: {type(e).__name__}: {e}")
    return rows


class Loader:
    """torch Dataset over tasks (lists of units), decoded in DataLoader worker processes:
    task -> (uint8 pixels [rows, H, W, 3], rows per unit, skipped [{path, reason}])."""

    def __init__(self, tasks, opts):
        self.tasks, self.opts, self.luts = tasks, opts, None
        if opts.get("palette") is not None:
            self.luts = annotation_luts(opts["palette"], opts.get("palette_name"))

    def __len__(self):
        return len(self.tasks)

    def __getitem__(self, i):
        images, rows, skipped = [], [], []
        for unit in self.tasks[i]:
            try:
                out = load_unit(unit, self.opts, self.luts)
            except Exception as e:  # never fatal: recorded with its reason
                out = []
                path = f"{unit[1]}:{unit[2]}" if unit[0] == "tar" else unit[1]
                skipped.append({"path": path, "reason": str(e) if isinstance(e, Skip)
                                else f"{type(e).__name__}: {e}"})
            rows.append(len(out))
            images += out
        s = self.opts["size"]
        return np.stack(images) if images else np.zeros((0, s, s, 3), np.uint8), rows, skipped


# -----------------------------------------------------------------------------
# the tokenizer


def load_tokenizer(vqgan_path=None, config=None, seed=0, device=None):
    """(model, identity). config: a randomly initialised vqgan.CONFIGS entry, for tests only."""
    import torch
    import vqgan
    from infra import vqgan_checkpoint
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if vqgan_path:
        model, identity = (vqgan_checkpoint.load_pretrained(vqgan_path, device=device),
                           {"path": str(vqgan_path)})
    elif config in vqgan.CONFIGS:
        print(f"warning: random {config!r} VQ-GAN (for tests only): "
              "pass --vqgan CKPT for real data", file=sys.stderr)
        torch.manual_seed(seed)
        model, identity = (vqgan.VQGAN(vqgan.CONFIGS[config]).to(device).eval(),
                           {"config": config, "seed": seed})
    else:
        raise ValueError("pass --vqgan CKPT (a VQ-GAN checkpoint directory); --vqgan_config must "
                         f"be one of {', '.join(vqgan.CONFIGS)}")
    if model.config["num_embeddings"] > 65536:
        raise ValueError(f"a codebook of {model.config['num_embeddings']} codes does not fit "
                         "uint16 token files")
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    identity.update(sha256=h.hexdigest(), resolution=model.config["resolution"],
                    num_embeddings=model.config["num_embeddings"],
                    downsample_factor=model.downsample_factor)
    return model, identity


def encode(model, pixels):
    """uint8 [B, H, W, 3] -> uint16 tokens [B, S] (the VQ-GAN sees float [B, 3, H, W] in [0, 1])."""
    device = next(model.parameters()).device
    x = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2).contiguous().float().div_(255)
    return model.encode(x, batch_size=len(x)).cpu().numpy().astype(np.uint16)


# -----------------------------------------------------------------------------
# a tokenize job: units -> token file, committed block by block so a killed run resumes where it
# stopped

BLOCK = {"images": 1024, "pairs": 512, "video": 32}  # units per commit (and per shard boundary)
TASK = {"images": 64, "pairs": 32, "video": 1}  # units per worker task


def _fingerprint(*parts):
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _stamps(units):
    """(size, mtime) of every input file: a file rewritten in place (a toy world drawn anew) changes
    the job."""
    def stamp(path):
        try:
            st = os.stat(path)
            return [st.st_size, st.st_mtime_ns]
        except OSError:
            return None
    paths = {"image": lambda u: [u[1]], "tar": lambda u: [u[1]], "video": lambda u: [u[1]],
             "skip": lambda u: [], "pair": lambda u: [u[1], u[2]],
             "frames": lambda u: [os.path.join(u[1], n) for n in u[2]]}
    return [[stamp(p) for p in paths[u[0]](u)] for u in units]


def _complete(prefix, fingerprint):
    """The metadata of a finished file of the same job, else None."""
    try:
        meta, size = (json.loads(Path(f"{prefix}.json").read_text()),
                      os.path.getsize(f"{prefix}.tokens"))
    except (OSError, ValueError):
        return None
    ok = (meta.get("fingerprint") == fingerprint
          and size == 2 * meta["num_images"] * meta["tokens_per_image"])
    return meta if ok else None


def _read_progress(path, fingerprint):
    """Committed block records of an interrupted run of the same job ([] if none). A last line cut
    by the kill (no newline, or not JSON) was never committed."""
    records = []
    for line in (Path(path).read_text().split("\n")[:-1] if Path(path).exists() else []):
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    return records[1:] if records and records[0].get("fingerprint") == fingerprint else []


@contextlib.contextmanager
def _writing(prefix):
    """A failed write of the output (a full disk: ENOSPC, or EFBIG past a file-size limit) as one
    line saying where and what to do; what was committed before it is kept for the rerun."""
    try:
        yield
    except OSError as e:
        raise OSError(f"could not write {prefix}.tokens ({e.strerror or e}); free disk space, "
                      "then run the same command again: it goes on after the last finished "
                      "block") from None


def _finish(prefix, meta, rows, groups, skipped):
    """Write NAME.json, then move NAME.tokens.partial into place: each step atomic."""
    if meta["kind"] != "video":  # pairs: one group, or runs of pairs_per_group pairs
        step = 2 * meta["pairs_per_group"] if "pairs_per_group" in meta else rows
        groups = [[first, min(step, rows - first)] for first in range(0, rows, max(1, step))]
    meta = dict(meta, num_images=rows, groups=groups, skipped=skipped)
    Path(f"{prefix}.json.tmp").write_text(json.dumps(meta, indent=1))
    os.replace(f"{prefix}.json.tmp", f"{prefix}.json")
    os.replace(f"{prefix}.tokens.partial", f"{prefix}.tokens")
    return meta


def tokenize(units, kind, opts, model, tokenizer, out, name, info=None, batch_size=128,
             num_workers=2, num_shards=1, shard_id=0, block=None):
    """Tokenize `units` (or this shard's share of them) into OUT/NAME.tokens + .json; returns the
    metadata."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm
    S, block = (opts["size"] // model.downsample_factor) ** 2, block or BLOCK[kind]
    job = _fingerprint(kind, units, _stamps(units), opts, tokenizer["sha256"], block)
    fingerprint = job if num_shards == 1 else _fingerprint(job, shard_id, num_shards)
    # a shard is a run of whole blocks
    blocks = [units[i:i + block] for i in range(0, len(units), block)]
    lo, hi = len(blocks) * shard_id // num_shards, len(blocks) * (shard_id + 1) // num_shards
    prefix = Path(out) / (name if num_shards == 1 else f"{name}-{shard_id:05d}-of-{num_shards:05d}")
    if done := _complete(prefix, fingerprint):
        # left if a kill came just after the finish
        Path(f"{prefix}.progress").unlink(missing_ok=True)
        print(f"{prefix}.tokens is up to date ({done['num_images']} images)")
        return done
    new_folder = not prefix.parent.exists()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    progress, partial = Path(f"{prefix}.progress"), Path(f"{prefix}.tokens.partial")
    records = _read_progress(progress, fingerprint)
    rows = records[-1]["rows"] if records else 0
    if records and (not partial.exists() or partial.stat().st_size < 2 * rows * S):
        records, rows = [], 0  # the tokens the records vouch for are gone: start afresh
    if records:
        print(f"{name}: resuming after {len(records)} of {hi - lo} blocks ({rows} images)",
              file=sys.stderr)
    progress.write_text("".join(json.dumps(r) + "\n"
                                for r in [{"fingerprint": fingerprint}] + records))
    partial.touch()
    tasks = [(b, blocks[b][i:i + TASK[kind]]) for b in range(lo + len(records), hi)
             for i in range(0, len(blocks[b]), TASK[kind])]
    # FFmpeg keeps thread pools that a forked worker inherits dead (it hangs if this process decoded
    # a video before): video workers start as fresh processes
    context = "spawn" if num_workers and kind == "video" else None
    loader = DataLoader(Loader([task for _, task in tasks], opts), batch_size=None,
                        num_workers=num_workers, pin_memory=next(model.parameters()).is_cuda,
                        prefetch_factor=4 if num_workers else None, multiprocessing_context=context)
    bar = tqdm(total=sum(map(len, blocks[lo:hi])),
               initial=sum(map(len, blocks[lo:lo + len(records)])), desc=name,
               unit="input", dynamic_ncols=True)
    t0, new_rows, pending, groups, skipped = time.time(), 0, [], [], []
    with _writing(prefix), open(partial, "r+b") as f, open(progress, "a") as log:
        f.truncate(2 * rows * S)
        f.seek(2 * rows * S)
        for t, (pixels, counts, bad) in enumerate(loader):
            for c in counts:
                groups += [[rows, c]] if c and kind == "video" else []
                rows += c
            skipped += bad
            pending.append(pixels)
            n = sum(map(len, pending))
            end_of_block = t + 1 == len(tasks) or tasks[t + 1][0] != tasks[t][0]
            # the same batches in every run: the same bytes
            while n >= batch_size or (end_of_block and n):
                x, b = torch.cat(pending), min(n, batch_size)
                f.write(encode(model, x[:b]).tobytes())
                pending, n, new_rows = [x[b:]], n - b, new_rows + b
            # commit: the tokens reach the file before the record that vouches for them
            if end_of_block:
                f.flush()
                records.append(dict(block=tasks[t][0], rows=rows, groups=groups, skipped=skipped))
                log.write(json.dumps(records[-1]) + "\n")
                log.flush()
                pending, groups, skipped = [], [], []
            bar.update(len(counts))
            bar.set_postfix_str(f"{new_rows / (time.time() - t0):.0f} img/s", refresh=False)
    bar.close()
    if rows == 0 and num_shards == 1:  # no input was readable: an error, not an empty file
        progress.unlink()
        partial.unlink()
        if new_folder and not any(prefix.parent.iterdir()):
            prefix.parent.rmdir()
        bad = [s for r in records for s in r["skipped"]]
        example = f", e.g. {bad[0]['path']}: {bad[0]['reason']}" if bad else ""
        raise ValueError(f"none of the {len(units)} inputs of {name} could be read{example}")
    meta = dict(kind=kind, tokens_per_image=S, num_images=rows, image_size=opts["size"],
                vocab_size=tokenizer["num_embeddings"], groups=[], **(info or {}), skipped=[],
                tokenizer=tokenizer, fingerprint=fingerprint,
                **({"shard": [shard_id, num_shards], "job": job} if num_shards > 1 else {}))
    with _writing(prefix):
        meta = _finish(prefix, meta, rows, [g for r in records for g in r["groups"]],
                       [s for r in records for s in r["skipped"]])
    progress.unlink()
    print(f"{prefix}.tokens: {rows} images, {len(meta['skipped'])} inputs skipped "
          f"({new_rows / (time.time() - t0):.0f} img/s)", file=sys.stderr)
    return meta


def merge(out, name):
    """Concatenate the finished shards NAME-0000i-of-K into NAME: the same file as one unsharded
    run."""
    parts = sorted(p for p in Path(out).glob(f"{name}-*-of-*.json")
                   if re.fullmatch(rf"{re.escape(name)}-\d{{5}}-of-\d{{5}}", p.stem))
    metas = [json.loads(p.read_text()) for p in parts]
    if not metas:
        raise ValueError(f"no shards {name}-*-of-*.json in {out}")
    k = metas[0]["shard"][1]
    if ([m["shard"] for m in metas] != [[i, k] for i in range(k)]
            or len({m["job"] for m in metas}) != 1):
        have = ", ".join(p.stem for p in parts)
        raise ValueError(f"need all {k} shards of one job to merge, found: {have}; finish the "
                         "missing shard runs")
    unfinished = [p.stem for p, m in zip(parts, metas)
                  if not _complete(p.with_suffix(""), m["fingerprint"])]
    if unfinished:
        raise ValueError(f"shards {', '.join(unfinished)} have no complete .tokens file: rerun "
                         "them")
    prefix, rows, groups = Path(out) / name, 0, []
    with open(f"{prefix}.tokens.partial", "wb") as f:
        for p, m in zip(parts, metas):
            with open(p.with_suffix(".tokens"), "rb") as g:
                shutil.copyfileobj(g, f, 1 << 24)
            groups += [[first + rows, n] for first, n in m["groups"]]
            rows += m["num_images"]
    meta = {k: v for k, v in metas[0].items() if k not in ("shard", "job")}
    meta["fingerprint"] = metas[0]["job"]
    return _finish(prefix, meta, rows, groups, [s for m in metas for s in m["skipped"]])


# -----------------------------------------------------------------------------
# a picture of sequences, decoded from token files (for the README)


def show(data_dir, model, out_png, names="*", per_kind=1, n_images=16, seed=0):
    """PNG grid, a sequence per row: for each token file, `per_kind` sequences of each kind it
    feeds, decoded."""
    import torch
    from PIL import ImageDraw
    rng, labels, seqs = np.random.default_rng(seed), [], []
    files = {p.stem: load_tokens(p) for p in sorted(Path(data_dir).glob(f"{names}.json"))}
    S = (model.config["resolution"] // model.downsample_factor) ** 2
    for name, d in files.items():
        if d.meta["tokens_per_image"] != S or d.meta["vocab_size"] > model.config["num_embeddings"]:
            raise ValueError(f"{name} was tokenized by another VQ-GAN "
                             f"({d.meta['tokens_per_image']} tokens per image of "
                             f"{d.meta['vocab_size']} codes; this one: {S} of "
                             f"{model.config['num_embeddings']}): pass its --vqgan")
    uses = dict(single="images", natural="video", discriminative="pairs", generative="pairs",
                random="images")
    for kind, name in [(k, n) for k in uses for n, d in files.items() if d.meta["kind"] == uses[k]]:
        for _ in range(per_kind):
            if kind in ("single", "random"):  # n_images images of the stage-1 stream
                position = int(rng.integers(len(files[name])))
                seq = random_sequence(files[name], position, seed, n_images)
            else:
                seq = SEQUENCE_BUILDERS[kind](files[name], rng,
                                              n_images // (2 if uses[kind] == "pairs" else 1))
            seqs.append(seq.reshape(-1, files[name].meta["tokens_per_image"]))
            labels.append(f"{kind}: {name}")
    if not seqs:
        raise ValueError(f"no token files {names}.json in {data_dir}")
    codes = torch.from_numpy(np.concatenate(seqs)).to(next(model.parameters()).device)
    pixels = ((model.decode(codes).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1)
              .cpu().numpy())
    res, first = pixels.shape[1], np.cumsum([0] + [len(q) for q in seqs])
    scale, label_width = max(1, 64 // res), 240
    tile = res * scale + 2
    canvas = Image.new("RGB", (label_width + n_images * tile, len(seqs) * tile), "white")
    draw = ImageDraw.Draw(canvas)
    for r, label in enumerate(labels):
        draw.text((4, r * tile + tile // 2 - 7), label, fill="black", font_size=13)
        for c in range(len(seqs[r])):
            img = Image.fromarray(pixels[first[r] + c]).resize((res * scale,) * 2, Image.NEAREST)
            canvas.paste(img, (label_width + c * tile + 1, r * tile + 1))
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png)


# -----------------------------------------------------------------------------
# command line


def toyworld_jobs(root):
    """(kind, units, name, opts, info) of every split of a toy world:
    {split}_{images,video,segmentation,...}."""
    try:
        meta = json.loads((Path(root) / "meta.json").read_text())
    except FileNotFoundError:
        raise ValueError(f"{root} is not a toy world (no meta.json): run python toy/toyworld.py "
                         f"--out {root}")
    jobs = []
    for split in meta["splits"]:
        images, videos = str(Path(root, split, "images")), str(Path(root, split, "videos"))
        jobs.append(("images", list_images([images]), f"{split}_images", {}, {"sources": [images]}))
        jobs.append(("video", list_videos([videos]), f"{split}_video",
                     {"stride": 1, "max_frames": 256}, {"stride": 1, "sources": [videos]}))
        tasks = dict(meta["tasks"], **{meta["mapping"]["folder"]: ("images", "recoloured")})
        for task, (query, answer) in tasks.items():
            palette = meta["palette"] if task == "segmentation" else None
            folders = [str(Path(root, split, query)), str(Path(root, split, answer))]
            # a recoloured map's palette holds for its group only: a sequence stays in one group
            group = meta["mapping"]["group"][split] if task == meta["mapping"]["folder"] else None
            jobs.append(("pairs", list_pairs(*folders), f"{split}_{task}", {"palette": palette},
                         {"annotation": task, "palette": palette, "sources": folders,
                          **({"pairs_per_group": group} if group else {})}))
    return jobs


def at_least(low):
    """argparse type: an int >= low."""
    def parse(text):
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = "int"  # argparse's word for a value that is not a number
    return parse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    tok = argparse.ArgumentParser(add_help=False)
    tok.add_argument("--vqgan",
                     help="VQ-GAN checkpoint: a directory infra/vqgan_checkpoint.py reads")
    tok.add_argument("--vqgan_config",
                     help="TESTS ONLY: randomly initialised weights of this vqgan.CONFIGS entry")
    tok.add_argument("--seed", type=int, default=0,
                     help="of --vqgan_config's weights and of `show`'s sequences")
    tok.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    job = argparse.ArgumentParser(add_help=False, parents=[tok])
    job.add_argument("--out", default="data/tokens", help="output directory")
    job.add_argument("--batch_size", type=at_least(1), default=128, help="images per VQ-GAN call")
    job.add_argument("--num_workers", type=at_least(0),
                     default=min(8, max(1, (os.cpu_count() or 2) - 1)),
                     help="decoding processes (0: decode in this process)")
    job.add_argument("--num_shards", type=at_least(1), default=1,
                     help="split the inputs over this many runs (machines)")
    job.add_argument("--shard_id", type=at_least(0), default=0,
                     help="this run's share; `merge` joins the shards")
    job.add_argument("--block", type=at_least(1),
                     help=f"inputs per commit (default {BLOCK}): a kill loses at most one")
    named = argparse.ArgumentParser(add_help=False, parents=[job])
    named.add_argument("--name", required=True, help="writes OUT/NAME.tokens and OUT/NAME.json")
    s = sub.add_parser("images", parents=[named],
                       help="single images: folders (recursive), webdataset .tar shards")
    s.add_argument("--input", nargs="+", required=True,
                   help="image folders, image files, .tar shards")
    s = sub.add_parser("video", parents=[named], help="video files (PyAV) and folders of frames")
    s.add_argument("--input", nargs="+", required=True,
                   help="video files, folders of them, folders of frames")
    s.add_argument("--stride", type=at_least(1), default=1, help="keep every stride-th frame")
    s.add_argument("--max_frames", type=at_least(1), default=256,
                   help="frames kept per video (after the stride)")
    s = sub.add_parser("pairs", parents=[named],
                       help="image and annotation folders matched by file stem")
    s.add_argument("--images", required=True, help="image folder (recursive)")
    s.add_argument("--annotations", required=True,
                   help="annotation folder (recursive), same file stems")
    s.add_argument("--annotation", default="segmentation",
                   help="what they are: segmentation, edges, depth, ...")
    s.add_argument("--palette",
                   help=f"{', '.join(PALETTES)} or a JSON file of [r, g, b] per class index; "
                   "needed for class-index PNGs (ADE20K's store class c as c + 1)")
    s = sub.add_parser("toyworld", parents=[job],
                       help="every split and kind of a toy world (toy/toyworld.py)")
    s.add_argument("--root", default="data/toyworld", help="toy world folder")
    s = sub.add_parser("merge", help="join the finished shards of a --num_shards run")
    s.add_argument("--out", default="data/tokens")
    s.add_argument("--name", required=True)
    s = sub.add_parser("show", parents=[tok],
                       help="decode a few sequences of each kind into a PNG grid")
    s.add_argument("--data", required=True, help="directory of token files")
    s.add_argument("--names", default="*", help="glob of the dataset names to show, e.g. 'train_*'")
    s.add_argument("--out", required=True, help="PNG path")
    s.add_argument("--per_kind", type=at_least(1), default=1, help="sequences per kind and file")
    s.add_argument("--n_images", type=at_least(1), default=16, help="images per sequence")
    args = p.parse_args(argv)
    if args.command != "show" and os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file: give a folder for the token files")

    if args.command == "merge":
        print(f"{args.out}/{args.name}.tokens: {merge(args.out, args.name)['num_images']} images")
        return
    if not 0 <= getattr(args, "shard_id", 0) < getattr(args, "num_shards", 1):
        p.error("--shard_id must be in [0, --num_shards)")
    if args.device:
        import torch
        try:
            device = torch.device(args.device)
        except RuntimeError:
            p.error(f"--device {args.device}: not a device (cpu, cuda, cuda:1, ...)")
        if device.type == "cuda" and not torch.cuda.is_available():
            p.error(f"--device {args.device}: this machine has no CUDA GPU; use --device cpu")
    jobs = []  # (kind, units, name, opts, info)
    if args.command == "toyworld":
        jobs = toyworld_jobs(args.root)
    elif args.command == "images":
        jobs = [("images", list_images(args.input), args.name, {}, {"sources": args.input})]
    elif args.command == "video":
        jobs = [("video", list_videos(args.input), args.name,
                 {"stride": args.stride, "max_frames": args.max_frames},
                 {"stride": args.stride, "sources": args.input})]
    elif args.command == "pairs":
        units = list_pairs(args.images, args.annotations)
        palette = load_palette(args.palette).tolist() if args.palette else None
        first = next((u[2] for u in units if u[0] == "pair"), None)
        if first and not palette and Image.open(first).mode in INDEX_MODES:
            print(f"warning: {first} has one channel: if the annotations are class indices, "
                  "pass --palette", file=sys.stderr)
        jobs = [("pairs", units, args.name,
                 {"palette": palette, "palette_name": args.palette},
                 {"annotation": args.annotation, "palette": palette,
                  "sources": [args.images, args.annotations]})]
    for _, units, name, _, info in jobs:
        if all(u[0] == "skip" for u in units):  # nothing to read: say why before loading the VQ-GAN
            why = f" ({len(units)} skipped, e.g. {units[0][1]}: {units[0][2]})" if units else ""
            raise ValueError(f"no inputs found for {name} in {', '.join(info['sources'])}{why}")
    model, tokenizer = load_tokenizer(args.vqgan, args.vqgan_config, args.seed, args.device)
    if args.command == "show":
        show(args.data, model, args.out, args.names, args.per_kind, args.n_images, args.seed)
        print(f"wrote {args.out}")
        return
    for kind, units, name, opts, info in jobs:
        tokenize(units, kind, dict(opts, size=tokenizer["resolution"]), model, tokenizer,
                 args.out, name, info, args.batch_size, args.num_workers, args.num_shards,
                 args.shard_id, args.block)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # OSError: a missing input, a full disk
        sys.exit(f"error: {e}")
