"""
In-context evaluation (paper sections 2.4 and A.2): the protocols and metrics behind Tables 1-6,
runnable offline.

    # FVD-16f (Table 1)
    python evaluate.py video        --model M --vqgan V --data data/toyworld/val --features tiny
    # FID, IS (Table 2)
    python evaluate.py generation   --model M --vqgan V --data ADEChallengeData2016
    # mIoU, FID (Table 3)
    python evaluate.py segmentation --model M --vqgan V --data cityscapes
    # held-out loss
    python evaluate.py perplexity   --model M --tokens data/tokens/val_video
    python evaluate.py all --model M --vqgan V --data data/toyworld --tokens T --features tiny \\
        --limit 32

Each protocol states the task with one prompt ("prompt, query"), samples the answer with top-k 100
at temperature 1 (A.2), decodes it with the VQ-GAN and scores it. The "Ground truth rec." row scores
the VQ-GAN round trip of the ground truth: the best a decoder-only model can do with this tokenizer.
--out gets a Markdown table per protocol in the paper's layout (tables.md), results.json and a PNG
grid per protocol (prompts, query, generation, truth).

--features standard uses the paper's networks: Inception-v3 of the ADM evaluator (torch-fidelity)
for FID/IS and StyleGAN-V's I3D TorchScript for FVD, both read from local files. --features tiny
uses a fixed random conv net: it ranks runs against each other offline, but its numbers are not
comparable with the paper's.
"""
import argparse
import itertools
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import tokenize_data
from infra.checkpoint import load_model
from data import SEQUENCE_BUILDERS, load_tokens
from infra.features import I3D_FILE, INCEPTION_FILE, TinyExtractor, make_extractor
from infra.images import PALETTES, VIDEO_EXTS, annotation_luts, save_grid, save_plot
from metrics import (colors_to_classes, confusion_matrix, feature_distance, inception_score,
                     labels_from_colours, miou_from_confusion, psnr, ssim)
from sample import WHERE_MODELS_COME_FROM, generate
from vqgan import codes_per_image, images_to_tokens, tokens_to_images
from infra.vqgan_checkpoint import load_pretrained

# -----------------------------------------------------------------------------
# datasets: ADE20K and Cityscapes validation layouts, the toy world, UCF-101 style videos. Files are
# listed with tokenize_data's functions and read by images.py, so evaluation sees images exactly as
# training did.


class LayoutError(FileNotFoundError):
    """The folder does not hold a dataset in the layout a protocol needs."""


@dataclass
class PairedSet:
    """Images with a per-pixel annotation: what the generation and segmentation protocols read."""
    name: str  # ade20k | cityscapes | toy
    units: list  # tokenize_data units ("pair", image path, annotation path), sorted
    palette: np.ndarray  # [K, 3] uint8: colour of class k in the maps the model reads and writes
    luts: dict  # class-index PNG -> colour tables for images.read_annotation
    # the annotation is a segmentation map, so classes can be read back from its colours
    segmentation: bool


def find_paired(root, split="val", annotation="segmentation"):
    """ADE20K (ADEChallengeData2016/{images,annotations}/validation), Cityscapes
    (leftImg8bit/val + gtFine/val) or the toy world (a folder written by toy/toyworld.py, or one of
    its splits: a task's query and answer folders, e.g. images/ + segmentation/)."""
    root = Path(root)
    for base in (root, root / "ADEChallengeData2016"):
        folder = {"val": "validation", "train": "training"}.get(split, split)
        if (base / "images" / folder).is_dir() and (base / "annotations" / folder).is_dir():
            return _paired("ade20k", base / "images" / folder,
                           base / "annotations" / folder, annotation)
    if (root / "leftImg8bit" / split).is_dir() and (root / "gtFine" / split).is_dir():
        return _paired("cityscapes", root / "leftImg8bit" / split,
                       root / "gtFine" / split, annotation)
    toy = root / split if (root / "meta.json").is_file() else root
    query, answer = toy_tasks(toy).get(annotation, ("images", annotation))
    if (toy / query).is_dir() and (toy / answer).is_dir():
        return _paired("toy", toy / query, toy / answer, annotation)
    raise LayoutError(
        f"{root} is not a paired dataset with a {split!r} split and {annotation!r} annotations: "
        "expected ADE20K (images/validation/*.jpg + annotations/validation/*.png), Cityscapes "
        "(leftImg8bit/val/CITY/*_leftImg8bit.png + gtFine/val/CITY/*_gtFine_labelTrainIds.png) or "
        f"a toy world split (images/ + {annotation}/, toy/toyworld.py)")


def toy_tasks(split_folder):
    """{task: (query folder, answer folder)} of a toy world split (toy/toyworld.py's meta.json)."""
    meta = Path(split_folder).parent / "meta.json"
    return {k: tuple(v) for k, v in json.loads(meta.read_text()).get("tasks", {}).items()} \
        if meta.is_file() else {}


def _paired(name, images, annotations, annotation):
    if name != "toy" and annotation != "segmentation":
        raise LayoutError(f"{name} has segmentation annotations only, not {annotation!r}")
    units = [u for u in tokenize_data.list_pairs(str(images), str(annotations)) if u[0] == "pair"]
    if not units:
        raise FileNotFoundError(f"no image in {images} has an annotation with the same name in "
                                f"{annotations}")
    palette = PALETTES[name]
    return PairedSet(name, units, palette, annotation_luts(palette, name),
                     annotation == "segmentation")


def read_pair(ds, unit, size):
    """(image uint8 [3, R, R], annotation colour map uint8 [3, R, R], classes int64 [R, R]
    (255 = ignore) or None)."""
    # copies: writable
    image, annotation = map(torch.tensor, tokenize_data.load_unit(unit, {"size": size}, ds.luts))
    labels = labels_from_colours(annotation, ds.palette) if ds.segmentation else None
    return image.permute(2, 0, 1), annotation.permute(2, 0, 1), labels


def find_videos(root, split="val"):
    """Video files (UCF-101: CLASS/*.avi) and frame folders under root, as tokenize_data units; for
    a toy world, its videos/ folder."""
    root = Path(root)
    videos = [f for f in (root / split / "videos", root / "videos") if f.is_dir()]
    images = (root / "meta.json").is_file() or any(
        (root / d).is_dir() for d in ("images", "leftImg8bit", "ADEChallengeData2016"))
    if images and not videos:  # an image dataset: its image folders are not frame folders
        raise LayoutError(f"{root} holds an image dataset, not videos")
    root = videos[0] if videos else root
    if not root.is_dir():
        raise LayoutError(f"video folder {root} does not exist")
    units = [u for u in tokenize_data.list_videos([str(root)]) if u[0] in ("video", "frames")]
    if not units:
        raise LayoutError(f"no videos ({', '.join(VIDEO_EXTS)}) or frame folders "
                          f"under {root}")
    return units


def read_clip(unit, frames, stride, size):
    """uint8 [frames, 3, R, R]: frames 0, stride, 2 stride, ... of a video unit; None if it is too
    short or broken."""
    try:
        rows = tokenize_data.load_unit(unit, {"size": size, "stride": stride, "max_frames": frames})
    except Exception:  # an unreadable video is skipped, as tokenize_data does
        return None
    return torch.from_numpy(np.stack(rows)).permute(0, 3, 1, 2) if len(rows) >= frames else None


# -----------------------------------------------------------------------------
# the protocols (2.4, A.2). Each takes (model, vqgan, data path, EvalConfig) and returns a dict of
# numbers: "model" (the generations' metrics) and "gt_rec" (the same metrics of the VQ-GAN round
# trip of the ground truth).


@dataclass
class EvalConfig:
    # at most this many queries (clips, images) or held-out sequences; None = all
    limit: int | None = None
    batch_size: int = 16  # queries generated at once
    temperature: float = 1.0  # A.2: temperature 1, top-k 100
    top_k: int = 100
    seed: int = 0  # picks the prompt pair and seeds sampling
    split: str = "val"
    # where the prompt pair comes from (default: split, without reusing it as query)
    prompt_split: str | None = None
    # the condition of conditional generation (toy world: segmentation|edges|depth)
    annotation: str = "segmentation"
    prompt_frames: int = 5  # video: 5 prompt frames, 11 generated, 16 in all (A.2)
    clip_frames: int = 16
    frame_stride: int = 1
    image_extractor: object = None  # features for FID/IS; None = TinyExtractor()
    video_extractor: object = None  # features for FVD; None = TinyExtractor(video=True)
    num_sequences: int = 256  # perplexity: held-out sequences per sequence kind
    # segmentation, generation: prompt pairs before the query (A.2: one is enough)
    prompt_pairs: int = 1
    # the task protocol's tasks (toy world)
    tasks: tuple = ("segmentation", "edges", "depth", "inpainting", "colorization")
    out: str | None = None  # folder for the PNG grids; None = no grid
    grid_rows: int = 8  # rows of a grid: a query each (a clip: two rows, truth above generation)
    grid_frame_step: int = 1  # a clip's grid shows every this-th frame


def _uint8(x):
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _sample(model, vqgan, prompt, n_images, cfg, generator):
    """Sample n_images images after prompt tokens [B, T] (A.2: top-k 100, temperature 1):
    (uint8 images [B, n, 3, H, W], their codes [B, n * tokens_per_image])."""
    S, device = codes_per_image(vqgan), next(model.parameters()).device
    seq = generate(model, prompt.to(device), n_images * S, cfg.temperature, cfg.top_k,
                   codebook_size=vqgan.config["num_embeddings"], generator=generator,
                   tokens_per_image=S)
    codes = seq[:, -n_images * S:]
    return _uint8(tokens_to_images(vqgan, codes, S).cpu()), codes.cpu()


def _round_trip(vqgan, images):
    """The VQ-GAN reconstruction of uint8 images [N, 3, H, W]: the "ground truth rec." of the
    paper's tables."""
    return _uint8(tokens_to_images(vqgan, images_to_tokens(vqgan, images)).flatten(0, 1).cpu())


def _gather(store, extractor, **sets):
    """Append each set's features (and logits, when the extractor has them) to store[name] lists."""
    for name, x in sets.items():
        feats, logits = extractor(x)
        store.setdefault(name, []).append(feats.float().cpu())
        if logits is not None:
            store.setdefault(name + "_logits", []).append(logits.float().cpu())


def _fid_is(store, name):
    """FID (FVD for clips) of the features gathered as `name` against the ground truth's, and IS of
    its logits."""
    cat = lambda k: torch.cat(store[k])
    return {"fid": feature_distance(cat(name), cat("gt")),
            "is": (inception_score(cat(name + "_logits"))[0] if name + "_logits" in store
                   else float("nan"))}


def _generator(model, seed):
    return torch.Generator(next(model.parameters()).device).manual_seed(seed)


def _save_grid(cfg, name, rows):
    if cfg.out and rows:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        save_grid(rows, Path(cfg.out) / f"{name}.png")
        return str(Path(cfg.out) / f"{name}.png")


def _batched(iterable, n):
    iterator = iter(iterable)
    while batch := list(itertools.islice(iterator, n)):
        yield batch


@torch.no_grad()
def eval_video(model, vqgan, data, cfg=EvalConfig()):
    """Video prediction (Table 1): 16-frame clips, the first 5 frames as the prompt, 11 generated.
    FVD-16f between the generated clips (prompt frames as the VQ-GAN decodes them + 11 new) and the
    true clips; per-frame PSNR and SSIM of the 11 generated frames against the truth, a check that
    needs no feature network."""
    size, S, T, P = (vqgan.config["resolution"], codes_per_image(vqgan), cfg.clip_frames,
                     cfg.prompt_frames)
    extractor = cfg.video_extractor or TinyExtractor(video=True)
    units, generator = find_videos(data, cfg.split), _generator(model, cfg.seed)
    skipped = 0

    # one clip per video (2.4), from its first frame; too short or unreadable videos are skipped
    def clips():
        nonlocal skipped
        for unit in units:
            clip = read_clip(unit, T, cfg.frame_stride, size)
            skipped += clip is None
            if clip is not None:
                yield clip

    n, store, rows, per_frame = 0, {}, [], {k: [] for k in ("psnr", "ssim", "rec_psnr", "rec_ssim",
                                                            "last_psnr", "last_ssim")}
    copied = torch.zeros(2, T - P)  # [copyable cells, of them right] per predicted frame
    bar = tqdm(total=cfg.limit or len(units), desc="video prediction", unit="clip")
    for batch in _batched(itertools.islice(clips(), cfg.limit), cfg.batch_size):
        truth = torch.stack(batch)  # [B, T, 3, R, R]
        B = len(truth)
        tokens = images_to_tokens(vqgan, truth.flatten(0, 1)).view(B, T * S)
        recon = _uint8(tokens_to_images(vqgan, tokens, S).cpu())
        sampled, codes = _sample(model, vqgan, tokens[:, :P * S], T - P, cfg, generator)
        generated = torch.cat([recon[:, :P], sampled], 1)
        copyable = copyable_cells(truth, P, S)  # [B, T - P, S]
        right = codes.view(B, T - P, S) == tokens[:, P * S:].view(B, T - P, S)
        copied += torch.stack([copyable.sum((0, 2)), (copyable & right).sum((0, 2))])
        _gather(store, extractor, gen=generated.transpose(1, 2), gt=truth.transpose(1, 2),
                rec=recon.transpose(1, 2))
        future = lambda x: x[:, P:].flatten(0, 1).float() / 255  # the predicted frames
        # the naive forecast: nothing moves after the prompt
        repeat_last = truth[:, P - 1:P].expand_as(truth)
        for prefix, x in (("", generated), ("rec_", recon), ("last_", repeat_last)):
            per_frame[prefix + "psnr"].append(psnr(future(x), future(truth)).view(B, T - P))
            per_frame[prefix + "ssim"].append(ssim(future(x), future(truth)).view(B, T - P))
        shown = slice(0, T, cfg.grid_frame_step)
        rows += [row for i in range(B) for row in (list(truth[i, shown]), [
            None if t < P else generated[i, t] for t in range(T)][shown])]
        rows, n = rows[:cfg.grid_rows], n + B
        bar.update(B)
    bar.close()
    if n == 0:
        raise ValueError(f"no video under {data} has the {(T - 1) * cfg.frame_stride + 1} "
                         "frames a clip needs")
    # mean over clips, per predicted frame
    frames = {k: torch.cat(v).mean(0) for k, v in per_frame.items()}
    name = ("toy" if any((p / "meta.json").is_file() for p in (Path(data), Path(data).parent))
            else Path(data).name)
    return dict(protocol="video", dataset=name, queries=n, skipped=skipped, features=extractor.name,
                model=dict(fvd=_fid_is(store, "gen")["fid"], psnr=frames["psnr"].mean().item(),
                           ssim=frames["ssim"].mean().item(),
                           psnr_per_frame=frames["psnr"].tolist(),
                           ssim_per_frame=frames["ssim"].tolist(),
                           # of the cells a frame shows that some prompt frame showed already
                           # (what copying could get right), those whose code is the truth's (%)
                           copyable_right_per_frame=(100 * copied[1] / copied[0]).tolist(),
                           copyable_share_per_frame=(100 * copied[0] / (n * S)).tolist()),
                gt_rec=dict(fvd=_fid_is(store, "rec")["fid"], psnr=frames["rec_psnr"].mean().item(),
                            ssim=frames["rec_ssim"].mean().item()),
                repeat_last=dict(psnr=frames["last_psnr"].mean().item(),
                                 ssim=frames["last_ssim"].mean().item(),
                                 psnr_per_frame=frames["last_psnr"].tolist()),
                grid=_save_grid(cfg, f"video_{name}", rows))


def copyable_cells(clips, prompt_frames, tokens_per_image):
    """bool [B, T - P, S]: the cells (one token's patch each) of the frames after the first P
    whose pixels equal those of some cell of the first P frames: what a model could continue by
    copying."""
    B, T, C, R, _ = clips.shape
    g = math.isqrt(tokens_per_image)
    c = R // g
    cells = clips.reshape(B, T, C, g, c, g, c).permute(0, 1, 3, 5, 2, 4, 6).reshape(B, T, g * g, -1)
    out = torch.zeros(B, T - prompt_frames, g * g, dtype=torch.bool)
    for b in range(B):
        seen = {cell.numpy().tobytes() for cell in cells[b, :prompt_frames].flatten(0, 1)}
        for t in range(prompt_frames, T):
            out[b, t - prompt_frames] = torch.tensor([x.numpy().tobytes() in seen
                                                      for x in cells[b, t]])
    return out


def _prompt_and_queries(data, cfg, annotation, num_prompts=1):
    """(paired set, the prompts' paired set, the prompt units, the query units): the same prompts
    for all queries, drawn by seed from the prompt split (A.2: "we randomly sample one of the
    training set prompts and use the same prompt for all"). The first prompt is the same whatever
    num_prompts is."""
    ds = find_paired(data, cfg.split, annotation)
    prompts = (ds if cfg.prompt_split in (None, cfg.split)
               else find_paired(data, cfg.prompt_split, annotation))
    if num_prompts > len(prompts.units):
        raise ValueError(f"{data} has {len(prompts.units)} prompt pairs, fewer than the "
                         f"{num_prompts} asked for")
    first = int(np.random.default_rng(cfg.seed).integers(len(prompts.units)))
    rest = [i for i in np.random.default_rng(cfg.seed + 1).permutation(len(prompts.units))
            if i != first]
    chosen = [prompts.units[i] for i in ([first] + rest)[:num_prompts]]
    queries = [u for u in ds.units if u[1] not in {p[1] for p in chosen}][:cfg.limit]
    if not queries:
        raise ValueError(f"{data} has no query left besides the prompt pairs")
    return ds, prompts, chosen, queries


def _answer_queries(model, vqgan, data, cfg, annotation, to_annotation, desc, num_prompts=1):
    """The in-context image tasks (2.4): prompt pairs, "image, annotation" (to_annotation, e.g.
    segmentation) or "annotation, image" (generation), then each query. Returns (paired set, prompt
    units, prompt images, number of queries, batches of (query, generated answer, true answer: uint8
    [B, 3, R, R]; classes or None; fraction of the answer's codes equal to the true answer's codes
    [B]))."""
    size = vqgan.config["resolution"]
    ds, prompts, chosen, queries = _prompt_and_queries(data, cfg, annotation, num_prompts)
    pairs = [read_pair(prompts, u, size)[:2] for u in chosen]
    shown = [im for image, ann in pairs for im in ((image, ann) if to_annotation else (ann, image))]
    prompt_tokens = images_to_tokens(vqgan, torch.stack(shown)).view(1, -1) if shown else \
        torch.zeros(1, 0, dtype=torch.long)
    generator = _generator(model, cfg.seed)

    def batches():
        for units in tqdm(list(_batched(queries, cfg.batch_size)), desc=desc, unit="batch"):
            images, anns, labels = zip(*[read_pair(ds, u, size) for u in units])
            images, anns = torch.stack(images), torch.stack(anns)
            query, truth = (images, anns) if to_annotation else (anns, images)
            tokens = torch.cat([prompt_tokens.expand(len(query), -1).to(query.device),
                                images_to_tokens(vqgan, query).cpu()], 1)
            generated, codes = _sample(model, vqgan, tokens, 1, cfg, generator)
            accuracy = (codes.cpu() == images_to_tokens(vqgan, truth).cpu()).float().mean(1)
            yield (query, generated[:, 0], truth, torch.stack(labels) if ds.segmentation else None,
                   accuracy)

    return ds, chosen, shown, len(queries), batches()


@torch.no_grad()
def eval_generation(model, vqgan, data, cfg=EvalConfig()):
    """Conditional image generation (Table 2): the prompt pair "annotation, image", then the query's
    annotation; FID and IS of the generated images against the true images."""
    ds, chosen, shown, n, batches = _answer_queries(model, vqgan, data, cfg, cfg.annotation, False,
                                                    f"generation from {cfg.annotation}",
                                                    cfg.prompt_pairs)
    pair = shown[-2:]
    extractor, store, rows, psnrs = (cfg.image_extractor or TinyExtractor(), {}, [],
                                     {"gen": [], "rec": []})
    for query, generated, truth, _, _ in batches:
        recon = _round_trip(vqgan, truth)
        _gather(store, extractor, gen=generated, gt=truth, rec=recon)
        for name, x in (("gen", generated), ("rec", recon)):  # a weight-free check beside FID
            psnrs[name].append(psnr(x.float() / 255, truth.float() / 255))
        rows += [pair + [None, q, g, t]
                 for q, g, t in zip(query, generated, truth)][:cfg.grid_rows - len(rows)]
    scores = {name: {**_fid_is(store, name), "psnr": torch.cat(psnrs[name]).mean().item()}
              for name in psnrs}
    return dict(protocol="generation", dataset=ds.name, condition=cfg.annotation, queries=n,
                features=extractor.name, prompt=str(chosen[0][1]) if chosen else None,
                prompt_pairs=len(chosen), model=scores["gen"],
                gt_rec=scores["rec"],
                grid=_save_grid(cfg, f"generation_{ds.name}_{cfg.annotation}", rows))


@torch.no_grad()
def eval_segmentation(model, vqgan, data, cfg=EvalConfig()):
    """Semantic segmentation (Table 3): the prompt pair "image, segmentation map"
    (cfg.prompt_pairs of them), then the query image; the generated colour map read as classes by
    nearest palette colour; mIoU (in %, as the paper) over the classes present in the ground truth,
    FID between generated and true maps, and the share of answer codes equal to the codes of the
    true map."""
    ds, chosen, shown, n, batches = _answer_queries(model, vqgan, data, cfg, "segmentation", True,
                                                    "segmentation", cfg.prompt_pairs)
    extractor, store, rows, conf, conf_rec, conf_bg = (cfg.image_extractor or TinyExtractor(),
                                                       {}, [], 0, 0, 0)
    K, accuracy = len(ds.palette), []
    for query, generated, truth, labels, acc in batches:
        recon = _round_trip(vqgan, truth)
        conf += confusion_matrix(colors_to_classes(generated.permute(0, 2, 3, 1), ds.palette),
                                 labels, K)
        conf_rec += confusion_matrix(colors_to_classes(recon.permute(0, 2, 3, 1), ds.palette),
                                     labels, K)
        # baseline: class 0 (toy: background) everywhere
        conf_bg += confusion_matrix(torch.zeros_like(labels), labels, K)
        _gather(store, extractor, gen=generated, gt=truth, rec=recon)
        accuracy.append(acc)
        rows += [shown[-2:] + [None, q, g, t]
                 for q, g, t in zip(query, generated, truth)][:cfg.grid_rows - len(rows)]
    return dict(protocol="segmentation", dataset=ds.name, queries=n, features=extractor.name,
                prompt=str(chosen[0][1]) if chosen else None, prompt_pairs=len(chosen),
                num_classes=K,
                model=dict(miou=100 * miou_from_confusion(conf), fid=_fid_is(store, "gen")["fid"],
                           token_accuracy=100 * torch.cat(accuracy).mean().item()),
                gt_rec=dict(miou=100 * miou_from_confusion(conf_rec),
                            fid=_fid_is(store, "rec")["fid"]),
                first_class=dict(miou=100 * miou_from_confusion(conf_bg)),
                grid=_save_grid(cfg, f"segmentation_{ds.name}", rows))


@torch.no_grad()
def eval_curve(model, vqgan, data, cfg=EvalConfig(), counts=(0, 1, 2, 4, 7)):
    """The in-context curve: segmentation after 0, 1, 2, 4 and 7 prompt pairs, the same queries each
    time (with none, the model only sees the query and must guess what follows it). Token accuracy
    and mIoU per count."""
    ds = find_paired(data, cfg.split)
    prompts = ds if cfg.prompt_split in (None, cfg.split) else find_paired(data, cfg.prompt_split)
    # leave a query in a small split
    counts = [k for k in counts if k <= len(prompts.units) - (prompts is ds)]
    runs = [eval_segmentation(model, vqgan, data, replace(cfg, prompt_pairs=k, out=None))
            for k in counts]
    curve = dict(protocol="curve", dataset=runs[0]["dataset"], queries=runs[0]["queries"],
                 prompt_pairs=list(counts),
                 token_accuracy=[r["model"]["token_accuracy"] for r in runs],
                 miou=[r["model"]["miou"] for r in runs])
    if cfg.out:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        lines = {"answer-token accuracy": curve["token_accuracy"], "mIoU": curve["miou"]}
        curve["plot"] = save_plot(curve["prompt_pairs"], lines,
                                  Path(cfg.out) / f"curve_{curve['dataset']}.png", "prompt pairs")
    return curve


@torch.no_grad()
def eval_mapping(model, vqgan, data, cfg=EvalConfig(), counts=(1, 2, 4, 7)):
    """In-context learning of a mapping only the prompt shows (toy world): segmentation maps whose
    class -> colour palette is drawn anew for each group of pictures, the held-out split's palettes
    never used in training. Each query's prompt pairs are other pictures of its group (the next
    ones, in turn), so the answer's colours can be read from the examples only, and a class no pair
    shows cannot be known. Answers greedy (the argmax code), read as classes by the nearest colour
    of the group's palette; mIoU (%) per count, beside "shown" (the share of the queries' shape
    pixels whose class some prompt pair shows: what a perfect learner could know) and the oracle
    (the truth's VQ-GAN round trip read the same way: the best answer through this tokenizer,
    palette known)."""
    split = Path(data) / cfg.split
    meta = json.loads((Path(data) / "meta.json").read_text())
    mapping, size = meta["mapping"], vqgan.config["resolution"]
    ds = find_paired(data, cfg.split, "segmentation")  # the classes, from the fixed-palette maps
    folder, group = split / mapping["folder"], mapping["group"][cfg.split]
    palettes = [np.concatenate([[[0, 0, 0]], np.array(mapping["colours"])[p]]).astype(np.uint8)
                for p in mapping["palettes"][cfg.split]]
    units = ds.units[:len(ds.units) // group * group]  # whole groups only
    queries = list(range(len(units)))[:cfg.limit]
    items = {}

    def item(i):  # (picture, its recoloured map: uint8 [3, R, R], classes [R, R])
        if i not in items:
            image, _, labels = read_pair(ds, units[i], size)
            recoloured = tokenize_data.load_unit(
                ("pair", units[i][1], str(folder / Path(units[i][2]).name)), {"size": size})[1]
            items[i] = (image, torch.from_numpy(recoloured).permute(2, 0, 1), labels)
        return items[i]

    def prompts(i, k):  # the k pictures after i in its group, cyclically
        first = i // group * group
        return [first + (i - first + j) % group for j in range(1, k + 1)]

    greedy = replace(cfg, temperature=0.0, top_k=1)
    K, result = len(palettes[0]), dict(protocol="mapping", dataset="toy", queries=len(queries),
                                       prompt_pairs=[k for k in counts if k < group], miou=[],
                                       shown=[], token_accuracy=[])
    conf_oracle, rows = 0, []
    for k in result["prompt_pairs"]:
        conf, shown, accuracy = 0, [], []
        for batch in tqdm(list(_batched(queries, cfg.batch_size)), desc=f"mapping, {k} pairs",
                          unit="batch"):
            prompt = torch.stack([torch.stack([im for j in prompts(i, k) for im in item(j)[:2]])
                                  for i in batch])  # [B, 2k, 3, R, R]
            query = torch.stack([item(i)[0] for i in batch])
            truth = torch.stack([item(i)[1] for i in batch])
            labels = torch.stack([item(i)[2] for i in batch])
            tokens = torch.cat([images_to_tokens(vqgan, prompt.flatten(0, 1)).view(len(batch), -1),
                                images_to_tokens(vqgan, query).view(len(batch), -1)], 1).cpu()
            answer, codes = _sample(model, vqgan, tokens, 1, greedy, None)
            accuracy.append((codes == images_to_tokens(vqgan, truth).cpu()).float().mean(1))
            read_out = lambda x: torch.stack([colors_to_classes(a.permute(1, 2, 0), palettes[
                i // group % len(palettes)]) for a, i in zip(x, batch)])
            conf += confusion_matrix(read_out(answer[:, 0]), labels, K)
            if k == result["prompt_pairs"][0]:
                conf_oracle += confusion_matrix(read_out(_round_trip(vqgan, truth)), labels, K)
            for i, lab in zip(batch, labels):
                known = torch.zeros(K, dtype=torch.bool)
                for j in prompts(i, k):
                    known[item(j)[2].unique()] = True
                shapes = (lab > 0) & (lab < K)
                shown.append((known[lab[shapes]].float().mean() if shapes.any()
                              else torch.tensor(1.0)).item())
            if len(rows) < cfg.grid_rows and k == max(result["prompt_pairs"]):
                rows += [list(p) + [None, q, a, t] for p, q, a, t in
                         zip(prompt, query, answer[:, 0], truth)][:cfg.grid_rows - len(rows)]
        result["miou"].append(100 * miou_from_confusion(conf))
        result["shown"].append(100 * float(np.mean(shown)))
        result["token_accuracy"].append(100 * torch.cat(accuracy).mean().item())
    result["oracle"] = 100 * miou_from_confusion(conf_oracle)
    result["grid"] = _save_grid(cfg, "mapping_toy", rows)
    return result


DIFFERENT = 32  # grey levels by which two pictures must differ for a pixel to tell them apart


@torch.no_grad()
def eval_tasks(model, vqgan, data, cfg=EvalConfig()):
    """Does the prompt choose the task? Each held-out picture is asked once per task X (its query:
    the picture, or for inpainting and colorization its masked or grey version), with one prompt
    pair of task X (the same prompt picture for every task). Task identified: the answer is nearer
    (squared error) to X's true answer than to the other tasks' answers and to its own query, each
    over the pixels where the two differ, so copying the query is a miss and a colorization is
    judged on the hues it had to add. Uses the query: nearer to its
    own query's answer than to another query's. Reports both (%), the task x nearest-picture table
    (whole-picture MSE) and a picture: one query, a row per task."""
    tasks = list(cfg.tasks)
    split = Path(data) / cfg.split if (Path(data) / "meta.json").is_file() else Path(data)
    folders = {task: toy_tasks(split).get(task, ("images", task)) for task in tasks}
    answers, pictures, rows = {}, {}, []
    for task in tasks:
        ds, (prompt,), shown, n, batches = _answer_queries(model, vqgan, data, cfg, task, True,
                                                           f"task {task}")
        answers[task], queries, truths = map(torch.cat, zip(*[
            (generated, query, truth) for query, generated, truth, _, _ in batches]))
        pictures.update(zip(folders[task], (queries, truths)))
        rows.append(shown + [None, queries[0], answers[task][0], truths[0]])
    if n < 2:
        raise ValueError("the task protocol needs at least 2 queries "
                         "(one answer is compared with another's truth)")
    mse = lambda a, b: (a.float() - b.float()).pow(2).flatten(1).mean(1)
    names = list(pictures)
    nearest, identified, uses_query = {}, {}, {}
    for task in tasks:
        truth, answer = pictures[folders[task][1]], answers[task]
        winner = torch.stack([mse(answer, pictures[f]) for f in names], 1).argmin(1)
        nearest[task] = {f: 100 * (winner == j).float().mean().item() for j, f in enumerate(names)}
        # identified: nearer the truth than each other picture where the two differ (by more than
        # DIFFERENT levels): the hole of inpainting, the hues of colorization, not the whole image
        wins = torch.ones(len(answer), dtype=torch.bool)
        for f in {a for _, a in folders.values()} | {folders[task][0]}:
            where = ((truth.int() - pictures[f].int()).abs().amax(1, keepdim=True)
                     > DIFFERENT).expand_as(truth)
            closer = lambda x: ((answer.float() - x.float()).pow(2) * where).flatten(1).sum(1)
            wins &= ~where.flatten(1).any(1) | (closer(truth) < closer(pictures[f]))
        identified[task] = 100 * wins.float().mean().item()
        # the previous query's truth (the last query's for the first)
        uses_query[task] = 100 * (mse(answers[task], truth)
                                  < mse(answers[task], truth.roll(1, 0))).float().mean().item()
    return dict(protocol="tasks", dataset="toy", queries=n, tasks=tasks, identified=identified,
                uses_query=uses_query, nearest=nearest, grid=_save_grid(cfg, "tasks_toy", rows))


SEQUENCES = {"images": ["single"], "video": ["natural"], "pairs": ["discriminative", "generative"]}


@torch.no_grad()
def eval_perplexity(model, tokens, cfg=EvalConfig()):
    """Held-out next-token loss of a token file (data.py's contract), per sequence kind its data
    makes: mean cross-entropy over predicted tokens (nats), its exp (perplexity) and top-1
    next-token accuracy."""
    data = load_tokens(tokens)
    S, K, kind = data.meta["tokens_per_image"], data.meta["vocab_size"], data.meta["kind"]
    # 16 images (N = 16 of stage 2) if the context holds them
    n_images = min(16, model.args.max_seq_len // S)
    if n_images == 0 or model.args.vocab_size < K:
        raise ValueError(f"{tokens}: images of {S} tokens from a {K}-code tokenizer do not fit "
                         f"this model (context {model.args.max_seq_len}, vocabulary "
                         f"{model.args.vocab_size})")
    device, rng = next(model.parameters()).device, np.random.default_rng(cfg.seed)
    n = min(cfg.num_sequences, cfg.limit or cfg.num_sequences)
    out = {}
    for name in SEQUENCES[kind]:
        if name == "single":  # the first n images of the stage-1 stream: n different images
            seqs = SEQUENCE_BUILDERS[name](data, 0, n, cfg.seed)
        else:
            kwargs = dict(n_images=n_images) if name == "natural" else dict(n_pairs=n_images // 2)
            seqs = np.stack([SEQUENCE_BUILDERS[name](data, rng, **kwargs) for _ in range(n)])
        seqs = torch.from_numpy(seqs)
        nll, correct = 0.0, 0
        for i in tqdm(range(0, n, cfg.batch_size), desc=f"perplexity {name}", unit="batch"):
            x = seqs[i:i + cfg.batch_size].to(device)
            logits = model(x[:, :-1])[0][..., :K].float()  # image codes only, as sampling does
            nll += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
            correct += (logits.argmax(-1) == x[:, 1:]).sum().item()
        count = n * (seqs.shape[1] - 1)
        out[name] = dict(loss=nll / count, perplexity=math.exp(nll / count),
                         accuracy=100 * correct / count, tokens=count)
    return dict(protocol="perplexity", dataset=Path(str(tokens)).name, kind=kind, model=out)


# -----------------------------------------------------------------------------
# output: Markdown tables in the layout of the paper's Tables 1-3, results.json, PNG grids

COLUMNS = {  # protocol -> (metric, header, decimals)
    # Table 1
    "video": [("fvd", "FVD-16f ↓", 1), ("psnr", "PSNR ↑", 2), ("ssim", "SSIM ↑", 3)],
    # Table 2, plus PSNR
    "generation": [("fid", "FID ↓", 1), ("is", "IS ↑", 1), ("psnr", "PSNR ↑", 2)],
    "segmentation": [("miou", "mIOU ↑", 1), ("fid", "FID ↓", 1)],  # Table 3
}
# Table 2's "synthesis condition" names
CONDITIONS = {"segmentation": "seg.", "edges": "edge", "depth": "depth"}


def markdown_table(results, model_name="LVM-Lite"):
    """One Markdown table for results of one protocol (a column group per dataset or condition): a
    row for the model and a "Ground truth rec." row, as in the paper; a note below names the data
    and the feature network."""
    protocol = results[0]["protocol"]
    if protocol == "tasks":
        r = results[0]
        pictures = list(next(iter(r["nearest"].values())))
        lines = ["| prompt pair of | identified (%) | "
                 + " | ".join(f"nearest {p} (%)" for p in pictures)
                 + " | nearer own query than another (%) |", "|---" * (len(pictures) + 3) + "|"]
        lines += [f"| {t} | **{r['identified'][t]:.1f}** | "
                  + " | ".join(f"{r['nearest'][t][p]:.1f}" for p in pictures)
                  + f" | {r['uses_query'][t]:.1f} |" for t in r["tasks"]]
        return "\n".join(lines) + (f"\n\n{r['queries']} queries, one prompt pair each. Identified: "
                                   "nearer X's answer than the other tasks' answers and the "
                                   "query, each where the two differ; nearest: of the query's "
                                   "pictures, by pixel MSE.\n")
    if protocol == "curve":
        r = results[0]
        lines = ["| prompt pairs | " + " | ".join(map(str, r["prompt_pairs"])) + " |",
                 "|---" * (len(r["prompt_pairs"]) + 1) + "|",
                 "| answer-token accuracy (%) | "
                 + " | ".join(f"{v:.1f}" for v in r["token_accuracy"]) + " |",
                 "| segmentation mIoU (%) | " + " | ".join(f"{v:.1f}" for v in r["miou"]) + " |"]
        return "\n".join(lines) + f"\n\n{r['queries']} queries, the same at every count.\n"
    if protocol == "perplexity":
        lines = ["| Model | data | sequence | loss (nats) | "
                 "perplexity ↓ | next-token acc. (%) ↑ |", "|---" * 6 + "|"]
        for r in results:
            lines += [f"| {model_name} | {r['dataset']} | {seq} | {m['loss']:.3f} | "
                      f"{m['perplexity']:.1f} | {m['accuracy']:.1f} |"
                      for seq, m in r["model"].items()]
        return "\n".join(lines) + "\n"
    label = lambda r: r["dataset"] + (f" {CONDITIONS.get(r['condition'], r['condition'])}"
                                      if "condition" in r else "")
    header = ["Model"] + [f"{label(r)} {h}" for r in results for _, h, _ in COLUMNS[protocol]]
    cell = lambda v, d: "-" if v is None or math.isnan(v) else f"{v:.{d}f}"
    baselines = ((model_name, "model"), ("Ground truth rec.", "gt_rec"),
                 ("Repeat last prompt frame", "repeat_last"))
    rows = [[name] + [cell(r[key].get(k), d) for r in results for k, _, d in COLUMNS[protocol]]
            for name, key in baselines if all(key in r for r in results)]
    lines = (["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
             + ["| " + " | ".join(r) + " |" for r in rows])
    notes = "; ".join(f"{label(r)}: {r['queries']} queries" for r in results)
    return "\n".join(lines) + f"\n\n{notes}. Features: {results[0]['features']}.\n"


def write_results(results, out, model_name="LVM-Lite"):
    """out/tables.md (a table per protocol, in the paper's order) and out/results.json; returns the
    Markdown."""
    Path(out).mkdir(parents=True, exist_ok=True)
    titles = {"video": "Video prediction (Table 1)",
              "generation": "Conditional image generation (Table 2)",
              "segmentation": "Semantic segmentation (Table 3)",
              "tasks": "The prompt chooses the task", "curve": "In-context curve",
              "perplexity": "Held-out next-token prediction"}
    text = ""
    for protocol, title in titles.items():
        group = [r for r in results if r["protocol"] == protocol]
        if group:
            text += f"## {title}\n\n{markdown_table(group, model_name)}\n"
    (Path(out) / "tables.md").write_text(text)
    (Path(out) / "results.json").write_text(json.dumps(_json_safe(results), indent=1))
    return text


def _json_safe(x):
    """nan (a metric with too few samples) becomes null: JSON has no NaN."""
    if isinstance(x, (dict, list)):
        return ({k: _json_safe(v) for k, v in x.items()} if isinstance(x, dict)
                else [_json_safe(v) for v in x])
    return None if isinstance(x, float) and math.isnan(x) else x


# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Run the paper's in-context evaluation protocols on a "
                                "dataset folder and write Markdown tables (the paper's layout), "
                                "results.json and PNG grids.")
    p.add_argument("protocol", nargs="?",
                   choices=["video", "generation", "segmentation", "tasks", "curve", "perplexity",
                            "all"],
                   help="tasks, curve: the toy world's task-choice and 0-7 prompt-pair checks; "
                   "all: every protocol the data supports (the toy world has them all)")
    p.add_argument("--model",
                   help="ckpt.pt from training, or a Hugging Face LLaMA directory")
    p.add_argument("--vqgan",
                   help="VQ-GAN checkpoint directory (infra/vqgan_checkpoint.py); all but "
                        "perplexity")
    p.add_argument("--data", help="dataset folder: ADE20K, Cityscapes, UCF-101 / frame folders, or "
                                  "a toy world")
    p.add_argument("--tokens", nargs="+", default=[],
                   help="held-out token files D/NAME (perplexity)")
    p.add_argument("--out", default="out/eval",
                   help="folder for tables.md, results.json and the grids")
    p.add_argument("--name", help="model name in the tables (default: from --model)")
    p.add_argument("--features", choices=["standard", "tiny"], default="standard",
                   help="standard: Inception (torch-fidelity) and I3D, as the paper; "
                   "tiny: a random conv net, offline, NOT comparable with the paper's numbers")
    p.add_argument("--inception_weights",
                   help=f"path of {INCEPTION_FILE} (default: the torch hub cache)")
    p.add_argument("--i3d_weights", help=f"path of {I3D_FILE} (default: the torch hub cache)")
    p.add_argument("--annotation", default="segmentation",
                   help="condition(s) for generation, comma-separated "
                        "(toy world: segmentation,edges,depth)")
    p.add_argument("--limit", type=int,
                   help="at most this many queries (or held-out sequences), for quick runs")
    p.add_argument("--split", default="val")
    p.add_argument("--prompt_split",
                   help="split the one prompt pair is drawn from (default: --split)")
    for name, default in (("batch_size", 16), ("top_k", 100), ("seed", 0), ("prompt_frames", 5),
                          ("clip_frames", 16), ("frame_stride", 1), ("num_sequences", 256)):
        p.add_argument(f"--{name}", type=int, default=default, help=f"default {default}")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="model weights (default: bfloat16 on a GPU; on a CPU the checkpoint's own "
                        "dtype, bfloat16 where float32 would not fit in memory)")
    p.add_argument("--quantize", metavar="int8|int4",
                   help="the blocks' linear weights in 8 (or 4) bits (infra/quantize.py)")
    args = p.parse_args(argv)
    if not (args.protocol and args.model):
        p.error("pass a protocol (e.g. segmentation, or all), --model, and --vqgan and --data (the "
                f"toy world's: out/toy/world) for all but perplexity: {WHERE_MODELS_COME_FROM}")
    if args.protocol != "perplexity" and not (args.vqgan and args.data):
        p.error(f"{args.protocol} needs --vqgan and --data: a VQ-GAN directory and a dataset folder "
                "(ADE20K, Cityscapes, UCF-101 or a toy world; `python run_toy.py` writes "
                "out/toy/vqgan and out/toy/world)")
    if args.protocol == "perplexity" and not args.tokens:
        p.error("perplexity needs --tokens")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    shared = ("limit", "batch_size", "temperature", "top_k", "seed", "split", "prompt_split",
              "prompt_frames", "clip_frames", "frame_stride", "num_sequences", "out")
    cfg = EvalConfig(**{k: getattr(args, k) for k in shared})
    everything = ["video", "generation", "segmentation", "tasks", "curve", "perplexity"]
    wanted = everything if args.protocol == "all" else [args.protocol]
    runs = [("video", eval_video, cfg)] if "video" in wanted else []
    if "generation" in wanted:
        runs += [("generation", eval_generation, replace(cfg, annotation=a))
                 for a in args.annotation.split(",")]
    protocols = {"segmentation": eval_segmentation, "tasks": eval_tasks, "curve": eval_curve}
    runs += [(name, run, cfg) for name, run in protocols.items() if name in wanted]
    extractors, results = {}, []
    try:
        model = load_model(args.model, device, getattr(torch, args.dtype) if args.dtype else "auto",
                           quantize=args.quantize)
        if runs:
            tokenizer = load_pretrained(args.vqgan, device)
        for protocol, run, c in runs:
            # find the data first: 'all' skips tasks the folder does not have,
            # before loading any weights
            try:
                if protocol == "video":
                    find_videos(args.data, c.split)
                for annotation in (c.tasks if protocol == "tasks" else [] if protocol == "video"
                                   else [c.annotation]):
                    find_paired(args.data, c.split, annotation)
            except LayoutError as e:
                if args.protocol != "all":
                    raise
                print(f"skipping {protocol}: {e}", file=sys.stderr)
                continue
            video = protocol == "video"
            # each feature network is loaded once, and only when its task runs
            if video not in extractors:
                weights = args.i3d_weights if video else args.inception_weights
                extractors[video] = make_extractor(args.features, video, device, weights)
            c = replace(c, **{"video_extractor" if video else "image_extractor": extractors[video]})
            results.append(run(model, tokenizer, args.data, c))
        if "perplexity" in wanted:
            results += [eval_perplexity(model, t, cfg) for t in args.tokens]
    except (FileNotFoundError, ValueError, ImportError, MemoryError) as e:
        sys.exit(f"evaluate.py: error: {e}")
    model_path = Path(args.model)
    name = args.name or (model_path.parent.name if model_path.is_file() else model_path.name)
    print(write_results(results, args.out, name)
          + f"wrote {args.out}/tables.md, results.json and grids")


if __name__ == "__main__":
    main()
