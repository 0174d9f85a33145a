"""
Stage 2 of LVM-Lite (paper 2.3): fine-tune a stage-1 model on 16-image sequences (4096 tokens) drawn
from a weighted mixture of natural sequences (16 video frames), discriminative ones
(8 "image, annotation" pairs) and generative ones (8 "annotation, image" pairs). Table 8's
fine-tuning values are the defaults; the loop is train.py's (the one stage 1 uses), so every setting
of pretrain.py works here too.

    python finetune.py --init_from=out/pretrain --data=data/video/train,data/pairs/train \\
        --val_data=...
    # or start from a Hugging Face LLaMA directory
    python finetune.py --init_from=LVM_ckpts/7b --data=...
    torchrun --standalone --nproc_per_node=8 finetune.py --init_from=out/pretrain --data=... \\
        --parallel=fsdp
    T=data/toy_tokens; python finetune.py --stage=finetune-toy --init_from=out/toy-pretrain \\
        --device=cpu --data=$T/train_video,$T/train_segmentation,$T/train_edges,$T/train_depth \\
        --val_data=$T/val_video,$T/val_segmentation,$T/val_edges,$T/val_depth \\
        --out_dir=out/toy-finetune

--mix picks the kinds of sequences and their weights. The rows of Table 5:
    --mix=natural:1      --mix=generative:1      --mix=discriminative:1      --mix=random:1
    --mix=natural:1,generative:1      --mix=natural:1,generative:1,discriminative:1 (the default)
    --mix=natural:1,generative:1,discriminative:1,random:1
Each kind reads the --data files whose kind fits it (natural <- video, discriminative and generative
<- pairs, random <- images), choosing among them in proportion to their size.
"""
import sys

import numpy as np
import torch

import distributed
import train
from checkpoint import load_model
from configs import MODEL_SIZES
from data import SEQUENCE_BUILDERS, discriminative_sequence
from model import ModelArgs
from sample import generate
from train import TrainingError

SETTINGS = {
    **train.SETTINGS,
    "size": ("", "model size (configs.MODEL_SIZES); default: that of --init_from, which it must "
                 "match if given"),
    "stage": ("finetune",
              "optimisation defaults: a key of configs.STAGES (Table 8), e.g. finetune-toy"),
    "data": ("", "sequence token files (tokenize_data.py: video, pairs, images), comma-separated "
                 "path prefixes"),
    "out_dir": ("out/finetune",
                "checkpoint, metrics.jsonl, sample grids and the final Hugging Face export"),
    "init_from": ("", "stage-1 weights: pretrain.py's ckpt.pt (or its out_dir) or a Hugging Face "
                      "LLaMA directory"),
    "mix": ("natural:1,generative:1,discriminative:1",
            "sequence kinds and their weights, e.g. natural:2,random:1"),
    "probe_sequences": (16, "held-out pairs per pairs file that the in-context check answers at "
                            "each evaluation (0: no check; it writes 5 answers to each, minutes "
                            "on a CPU at full size)"),
}

SOURCES = {"natural": ("video",), "discriminative": ("pairs",), "generative": ("pairs",),
           "random": ("images",)}


def parse_mix(text):
    """'natural:1,generative:0.5' -> {'natural': 1.0, 'generative': 0.5}."""
    mix = {}
    for part in filter(None, text.split(",")):
        kind, _, weight = part.partition(":")
        if kind not in SOURCES:
            raise TrainingError(f"--mix: unknown sequence kind {kind!r}; use {', '.join(SOURCES)}")
        try:
            mix[kind] = float(weight or 1)
        except ValueError:
            raise TrainingError(f"--mix: weight {weight!r} of {kind} is not a number") from None
        if mix[kind] < 0:
            raise TrainingError(f"--mix: weight of {kind} is negative")
    if sum(mix.values()) <= 0:
        raise TrainingError(f"--mix={text} selects nothing: give at least one kind a "
                            "positive weight")
    return {kind: w for kind, w in mix.items() if w > 0}


def sequence_mixture(datasets, mix, images_per_seq, seed, flag="--data"):
    """Stage 2 batches: sequence i is built by a generator seeded with (seed, i), which draws its
    kind from the mixture, then a dataset of that kind, then the sequence (data.py's builders).
    Sequence i is the same whichever rank builds it and whenever, so ranks never share a sequence
    and a resumed run continues exactly."""
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
    length = images_per_seq * datasets[0].tokens.shape[1]

    def get(first, count):
        out = np.empty((count, length), dtype=np.int64)
        for j in range(count):
            rng = np.random.default_rng([seed, first + j])
            kind = kinds[rng.choice(len(kinds), p=weights)]
            fitting, p = sources[kind]
            data = fitting[rng.choice(len(fitting), p=p)]
            if kind in ("discriminative", "generative"):
                out[j] = SEQUENCE_BUILDERS[kind](data, rng, n_pairs=images_per_seq // 2)
            else:
                out[j] = SEQUENCE_BUILDERS[kind](data, rng, n_images=images_per_seq)
        return out

    return get


# prompt pairs before an answer, as in the evaluation's in-context curve
IN_CONTEXT_PAIRS = (0, 1, 2, 4, 7)


def in_context_probe(datasets, seed, num_sequences=16):
    """probe(model) -> {annotation: {pairs: %}}: for held-out pairs of each pairs file, the share of
    answer tokens the model gets right when it writes the answer itself (greedy) after 0, 1, 2, 4 or
    7 example pairs and the query image. Logged at every evaluation, it shows in-context learning
    appear: with no example the answer is a guess among the tasks; after one, the model knows which
    mapping to apply."""
    rng, probes = np.random.default_rng([seed, 2]), {}
    for data in (d for d in datasets if d.meta.get("kind") == "pairs"):
        name = data.meta.get("annotation") or "pairs"
        probes[name] = (torch.from_numpy(np.stack([
            discriminative_sequence(data, rng, max(IN_CONTEXT_PAIRS) + 1)
            for _ in range(num_sequences)])), data.meta.get("vocab_size"))
    if not probes:
        return None

    def probe(model):
        out = {}
        for name, (seqs, codebook) in probes.items():
            S = seqs.shape[1] // (2 * max(IN_CONTEXT_PAIRS) + 2)
            seqs, out[name] = seqs.to(model.output.weight.device), {}
            # prompt: pairs 0..k-1 and the image of pair k; answer: its annotation
            for k in IN_CONTEXT_PAIRS:
                answer = generate(model, seqs[:, :(2 * k + 1) * S], S, temperature=0,
                                  codebook_size=codebook)[:, -S:]
                out[name][str(k)] = (100 * (answer == seqs[:, (2 * k + 1) * S:(2 * k + 2) * S])
                                     .float().mean().item())
        return out

    return probe


def load_stage1(path, size=""):
    """The model to start from, in float32 whatever it was saved in: pretrain.py's checkpoint (its
    weights; optimizer and step start afresh) or a Hugging Face LLaMA directory (LVM's 7B,
    DeLVM's)."""
    if not path:
        raise TrainingError("stage 2 starts from stage-1 weights: pass --init_from=out/pretrain (a "
                            "ckpt.pt of pretrain.py, or its directory) or a Hugging Face LLaMA "
                            "directory; `python pretrain.py --data=...` makes one, or try the toy "
                            "world first: `python run_toy.py`")
    try:
        model = load_model(path, dtype=torch.float32)
    except (OSError, ValueError, KeyError, MemoryError) as e:
        raise TrainingError(f"--init_from={path}: {e}") from e
    if size and ModelArgs(**MODEL_SIZES[size]) != model.args:
        raise TrainingError(f"--init_from={path} holds a model that is not --size={size} "
                            f"({model.args}); drop --size to use the checkpoint's")
    return model


def main(argv=None):
    c = train.parse_config(argv, SETTINGS, __doc__)
    try:
        mix = parse_mix(c.mix)
        # --resume reads out_dir/ckpt.pt instead
        init = None if c.resume else load_stage1(c.init_from, c.size)
        datasets, val = train.open_train_and_val(c)
        fits = c.images_per_seq >= 2 * max(IN_CONTEXT_PAIRS) + 2
        probe = (in_context_probe(val, c.seed, c.probe_sequences)
                 if fits and c.probe_sequences else None)
        train.train(c, sequence_mixture(datasets, mix, c.images_per_seq, c.seed),
                    sequence_mixture(val, mix, c.images_per_seq, c.seed + 1, "--val_data"),
                    init, probe)
    except TrainingError as e:
        sys.exit(f"error: {e}")
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()
