"""
The token files and the training sequences made from them: the contract between tokenize_data.py
(which writes the files) and the training and evaluation scripts (which read them).

A dataset NAME in directory D is two files:
    D/NAME.tokens  raw uint16, row-major [num_images, tokens_per_image], one row per image
                   (np.memmap-able)
    D/NAME.json    kind (images | video | pairs), tokens_per_image, num_images, image_size,
                   vocab_size, groups ([first_row, num_rows] per video, per dataset for pairs),
                   annotation and palette (pairs), sources, skipped ([{path, reason}]), tokenizer
                   (checkpoint + sha256 of its weights)
Pairs rows alternate image, annotation, image, annotation, ...

    data = load_tokens("data/tokens/ade20k_train")
    # int64 [16 * S]
    seq = SEQUENCE_BUILDERS["discriminative"](data, np.random.default_rng(0), n_pairs=8)

The builders are the sequences of the paper: single (stage 1, 2.2: one image), natural
(16 frames of a video), discriminative (8 "image, annotation" pairs of one dataset), generative
(8 "annotation, image" pairs; all 2.3) and random (16 unrelated images: LVM's sequences, the
baseline of Tables 4 and 5).
"""
import json
import os
import re
from pathlib import Path

import numpy as np


class TokenData:
    def __init__(self, tokens, meta):
        self.tokens, self.meta = tokens, meta  # np.memmap uint16 [N, S], metadata dict
        self.groups = np.array(meta["groups"], np.int64).reshape(-1, 2)  # [first_row, num_rows]

    def __len__(self):
        return len(self.tokens)


def load_tokens(path_prefix):
    """TokenData of D/NAME (with or without the .tokens / .json suffix)."""
    prefix = re.sub(r"\.(tokens|json)$", "", str(path_prefix))
    try:
        meta = json.loads(Path(f"{prefix}.json").read_text())
        size = os.path.getsize(f"{prefix}.tokens")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e.filename} not found: tokenize the dataset first "
                                "(python tokenize_data.py -h)")
    n, s = meta["num_images"], meta["tokens_per_image"]
    if size != 2 * n * s:
        raise ValueError(f"{prefix}.tokens holds {size} bytes, its metadata says {n} x {s} uint16: "
                         f"rerun the tokenize command to finish it")
    tokens = (np.memmap(f"{prefix}.tokens", np.uint16, "r", shape=(n, s)) if n
              else np.zeros((0, s), np.uint16))
    return TokenData(tokens, meta)


def _need(data, kind):
    if data.meta["kind"] != kind:
        raise ValueError(f"this builder needs a {kind!r} token file, got {data.meta['kind']!r}")


def _pick(rng, counts):
    """(group, index within it) uniform over all sum(counts) items."""
    ends = np.cumsum(counts)
    if not len(ends) or ends[-1] == 0:
        raise ValueError("no group is long enough for this sequence: use fewer images per sequence")
    k = rng.integers(ends[-1])
    g = int(np.searchsorted(ends, k, side="right"))
    return g, k - (ends[g] - counts[g])


def single_image(data, rng):
    """Stage 1: one image, N = 1."""
    return data.tokens[rng.integers(len(data))].astype(np.int64)


def natural_sequence(data, rng, n_images=16):
    """n_images consecutive frames of one video, the window uniform over all windows."""
    _need(data, "video")
    g, start = _pick(rng, np.maximum(data.groups[:, 1] - n_images + 1, 0))
    first = data.groups[g, 0] + start
    return data.tokens[first:first + n_images].astype(np.int64).reshape(-1)


def _pairs(data, rng, n_pairs):
    """[n_pairs, 2, S]: random distinct (image, annotation) pairs of one dataset (group), the group
    chosen in proportion to its size; pairs repeat only if it has fewer than n_pairs."""
    _need(data, "pairs")
    counts = data.groups[:, 1] // 2
    g = _pick(rng, counts)[0]
    idx = rng.choice(counts[g], n_pairs, replace=counts[g] < n_pairs)
    rows = data.groups[g, 0] + 2 * idx[:, None] + np.arange(2)
    return data.tokens[rows.reshape(-1)].astype(np.int64).reshape(n_pairs, 2, -1)


def discriminative_sequence(data, rng, n_pairs=8):
    """"image, annotation" x n_pairs."""
    return _pairs(data, rng, n_pairs).reshape(-1)


def generative_sequence(data, rng, n_pairs=8):
    """"annotation, image" x n_pairs: the discriminative order inverted."""
    return _pairs(data, rng, n_pairs)[:, ::-1].reshape(-1)


def random_sequence(data, rng, n_images=16):
    """n_images unrelated images (the ablation of Table 5)."""
    rows = rng.choice(len(data), n_images, replace=len(data) < n_images)
    return data.tokens[rows].astype(np.int64).reshape(-1)


SEQUENCE_BUILDERS = {"single": single_image, "natural": natural_sequence,
                     "discriminative": discriminative_sequence,
                     "generative": generative_sequence, "random": random_sequence}
