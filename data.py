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

The builders are the sequences of the paper: single (stage 1, 2.2: one image each), natural
(16 frames of a video), discriminative (8 "image, annotation" pairs of one dataset), generative
(8 "annotation, image" pairs; all 2.3) and random (16 unrelated images: LVM's sequences, the
baseline of Tables 4 and 5). The streams at the end are what training reads (the batch contract).
"""
import functools
import json
import os
import re
from pathlib import Path

import numpy as np

from infra.settings import TrainingError


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


@functools.lru_cache(maxsize=2)  # the training and the validation stream's current epochs
def epoch_order(num_images, seed, epoch):
    """A random order of num_images images, drawn anew for each epoch (4 bytes per image)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_images)
    return order.astype(np.uint32 if num_images < 2**32 else np.int64)


def single_images(data, first, count, seed):
    """Stage 1: single images, N = 1. Images first .. first+count-1 of an endless stream that shows
    every image once per epoch, each epoch in a new random order (epoch_order): a run sees all its
    images equally often, and a position always gives the same image. int64 [count, S]."""
    positions = np.arange(first, first + count)
    epochs, index = np.divmod(positions, len(data))
    rows = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs):  # a batch may cross into the next epoch
        here = epochs == epoch
        rows[here] = epoch_order(len(data), seed, int(epoch))[index[here]]
    return data.tokens[rows].astype(np.int64)


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


def random_sequence(data, position, seed, n_images=16):
    """n_images unrelated images (LVM's sequences; the baseline of Tables 4 and 5): sequence
    `position` of single_images' stream cut into n_images-image pieces."""
    return single_images(data, position * n_images, n_images, seed).reshape(-1)


SEQUENCE_BUILDERS = {"single": single_images, "natural": natural_sequence,
                     "discriminative": discriminative_sequence,
                     "generative": generative_sequence, "random": random_sequence}


class JoinedTokens:
    """Several token files read as one: row r of the whole is row r - start of the file holding
    it."""

    def __init__(self, datasets):
        self.parts = [d.tokens for d in datasets]
        self.starts = np.cumsum([0] + [len(t) for t in self.parts])

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, rows):  # an array of row numbers
        part = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty((len(rows), self.parts[0].shape[1]), dtype=self.parts[0].dtype)
        for p in np.unique(part):
            out[part == p] = self.parts[p][rows[part == p] - self.starts[p]]
        return out


# -----------------------------------------------------------------------------
# The batch contract: training reads a stream, a function stream(first, count) that returns the
# int64 sequences first .. first+count-1 [count, L] of an endless, deterministic list of sequences.
# Step s reads batch_size sequences from its data position on, each process its own slice of them
# (train.rank_batch), so processes never share a sequence and a resumed run (the position is in its
# checkpoint) reads exactly what the unbroken run would have read.

# which kind of token file each kind of sequence is built from
SOURCES = {"natural": ("video",), "discriminative": ("pairs",), "generative": ("pairs",),
           "random": ("images",)}


def open_token_files(prefixes, tokens_per_image, flag="--data"):
    """Open comma-separated token files (path prefixes: data/x for data/x.tokens + data/x.json) and
    check that their images have the stage's tokens_per_image."""
    datasets = []
    for prefix in [p for p in prefixes.split(",") if p]:
        try:
            data = load_tokens(prefix)
        except (OSError, ValueError, KeyError, TypeError) as e:  # missing, bad JSON, wrong size
            raise TrainingError(f"{flag}: cannot read the token files {prefix}.tokens / "
                                f"{prefix}.json ({e}); write them with tokenize_data.py") from e
        per_image = data.meta.get("tokens_per_image")
        if per_image != tokens_per_image:
            raise TrainingError(f"{flag}: {prefix} has {per_image} tokens per image but the "
                                f"stage expects {tokens_per_image}: pass "
                                f"--tokens_per_image={per_image} or use matching data")
        datasets.append(data)
    if not datasets:
        raise TrainingError(f"no {flag} given: pass {flag}=PREFIX, token files PREFIX.tokens + "
                            "PREFIX.json, which `python tokenize_data.py images --input PHOTOS "
                            "--vqgan VQ --out data/tok --name photos` makes from a folder of "
                            "photos (VQ: LVM's released tokenizer; videos and pairs: its video and "
                            "pairs commands), or start with the toy world: `python run_toy.py`")
    return datasets


def open_train_and_val(train_prefixes, val_prefixes, tokens_per_image):
    """(--data, --val_data) token files; without --val_data the validation loss is measured on the
    training files."""
    datasets = open_token_files(train_prefixes, tokens_per_image, "--data")
    if not val_prefixes:
        print("note: no --val_data; the validation loss is measured on the training data")
        return datasets, datasets
    return datasets, open_token_files(val_prefixes, tokens_per_image, "--val_data")


def image_stream(datasets, images_per_seq, seed):
    """Stage 1's stream: sequence i is single_images' images i*n .. i*n+n-1 over all the files'
    images (n = images_per_seq: 1 in the paper, 16 for LVM's random sequences, Table 4's
    baseline). Every image is read once per epoch; no two processes read one image in a step."""
    data = datasets[0] if len(datasets) == 1 else TokenData(JoinedTokens(datasets),
                                                             dict(datasets[0].meta, groups=[]))

    def stream(first, count):
        return single_images(data, first * images_per_seq, count * images_per_seq,
                             seed).reshape(count, -1)

    return stream


def sequence_stream(datasets, mix, images_per_seq, seed, flag="--data"):
    """Stage 2's stream: sequence i is built by a generator seeded with (seed, i), which draws its
    kind from the mixture {kind: weight}, then a file of that kind (in proportion to its size),
    then the sequence (the builders above). Sequence i is the same whichever process builds it and
    whenever."""
    kinds = list(mix)
    weights = np.array([mix[k] for k in kinds]) / sum(mix.values())
    sources = {}
    for kind in kinds:
        fitting = [d for d in datasets if d.meta.get("kind") in SOURCES[kind]]
        if not fitting:
            raise TrainingError(f"--mix asks for {kind} sequences, but no file of {flag} "
                                f"is of kind {' or '.join(SOURCES[kind])}: add one, "
                                f"or drop {kind} from --mix")
        sizes = np.array([len(d.tokens) for d in fitting], dtype=np.float64)
        sources[kind] = (fitting, sizes / sizes.sum())
    if images_per_seq % 2 and ({"discriminative", "generative"} & set(kinds)):
        raise TrainingError(f"pair sequences need an even --images_per_seq, not {images_per_seq}")

    def build(i):
        rng = np.random.default_rng([seed, i])
        kind = kinds[rng.choice(len(kinds), p=weights)]
        fitting, p = sources[kind]
        data = fitting[rng.choice(len(fitting), p=p)]
        if kind == "random":
            return random_sequence(data, i, seed, images_per_seq)
        if kind == "natural":
            return natural_sequence(data, rng, images_per_seq)
        return SEQUENCE_BUILDERS[kind](data, rng, n_pairs=images_per_seq // 2)

    def stream(first, count):
        return np.stack([build(i) for i in range(first, first + count)])

    return stream

