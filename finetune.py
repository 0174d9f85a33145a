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

import data
import train
from configs import MODEL_SIZES
from infra import distributed
from infra.checkpoint import load_model
from infra.settings import TrainingError, parse_config
from model import ModelArgs
from sample import generate

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


def parse_mix(text):
    """'natural:1,generative:0.5' -> {'natural': 1.0, 'generative': 0.5}."""
    mix = {}
    for part in filter(None, text.split(",")):
        kind, _, weight = part.partition(":")
        if kind not in data.SOURCES:
            raise TrainingError(f"--mix: unknown sequence kind {kind!r}; use "
                                f"{', '.join(data.SOURCES)}")
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


# prompt pairs before an answer, as in the evaluation's in-context curve
IN_CONTEXT_PAIRS = (0, 1, 2, 4, 7)


def in_context_probe(datasets, seed, num_sequences=16):
    """probe(model) -> {annotation: {pairs: %}}: for held-out pairs of each pairs file, the share of
    answer tokens the model gets right when it writes the answer itself (greedy) after 0, 1, 2, 4 or
    7 example pairs and the query image. Logged at every evaluation, it shows in-context learning
    appear: with no example the answer is a guess among the tasks; after one, the model knows which
    mapping to apply."""
    rng, probes = np.random.default_rng([seed, 2]), {}
    for pairs in (d for d in datasets if d.meta.get("kind") == "pairs"):
        name = pairs.meta.get("annotation") or "pairs"
        probes[name] = (torch.from_numpy(np.stack([
            data.discriminative_sequence(pairs, rng, max(IN_CONTEXT_PAIRS) + 1)
            for _ in range(num_sequences)])), pairs.meta.get("vocab_size"))
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
    config = parse_config(argv, SETTINGS, __doc__)
    try:
        mix = parse_mix(config.mix)
        # --resume reads out_dir's checkpoint instead
        init = None if config.resume else load_stage1(config.init_from, config.size)
        datasets, val = data.open_train_and_val(config.data, config.val_data,
                                                config.tokens_per_image)
        fits = config.images_per_seq >= 2 * max(IN_CONTEXT_PAIRS) + 2
        probe = (in_context_probe(val, config.seed, config.probe_sequences)
                 if fits and config.probe_sequences else None)
        train.train(config,
                    data.sequence_stream(datasets, mix, config.images_per_seq, config.seed),
                    data.sequence_stream(val, mix, config.images_per_seq, config.seed + 1,
                                         "--val_data"),
                    init, probe)
    except TrainingError as e:
        sys.exit(f"error: {e}")
    except RuntimeError as e:  # another process died: one line on each of the others
        if not distributed.lost_peer(e):
            raise
        sys.exit(f"error: {distributed.lost_peer(e)}")
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()
