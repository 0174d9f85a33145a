"""
Stage 1 of LVM-Lite (paper 2.2): next-token training on single images of 256 VQ-GAN tokens, from
random weights. The loop is train.py's; this script brings stage 1's settings and sequences.

    python pretrain.py --size=300M --data=data/laion/train --val_data=data/laion/val \\
        --micro_batch_size=64
    torchrun --standalone --nproc_per_node=8 pretrain.py --size=1B --data=... --parallel=fsdp
    PJRT_DEVICE=TPU python pretrain.py --device=xla --size=3B --data=... --micro_batch_size=16
    # the toy world, on a CPU
    python pretrain.py --size=tiny --stage=pretrain-toy --data=data/toy_tokens/train_images \\
        --val_data=data/toy_tokens/val_images --out_dir=out/toy-pretrain --device=cpu

Every setting (train.SETTINGS) and every Table 8 value of the stage (configs.STAGES) can be changed
as --key=value. The global batch (--batch_size sequences) = micro_batch_size x devices x
gradient-accumulation steps. Output in --out_dir: ckpt.pt (every eval_interval steps, written
atomically; with --parallel=fsdp or on XLA, sharded: ckpt-STEP/, which out_dir/latest names; --resume
continues from it), metrics.jsonl, samples_<step>.png and, at the end, hf/
(Hugging Face LLaMA layout). --images_per_seq=16 trains on LVM's random 16-image sequences instead
(the baseline of Table 4).
"""
import sys

import numpy as np

import distributed
import train
from train import TrainingError

SETTINGS = train.SETTINGS  # stage 1's defaults are the shared ones: --stage=pretrain, --size=300M


def image_sequences(datasets, images_per_seq, seed):
    """Stage 1 batches: sequence i holds images i*n .. i*n+n-1 of a random order of all images,
    drawn anew each epoch. Every image is read once per epoch, and no two ranks (different i) read
    the same image in a step. images_per_seq > 1 gives LVM's random 16-image sequences (Table 4's
    baseline)."""
    sizes = np.array([len(d.tokens) for d in datasets])
    starts, total = np.concatenate([[0], np.cumsum(sizes)[:-1]]), int(sizes.sum())
    per_image = datasets[0].tokens.shape[1]
    orders = {}

    def order(epoch):
        if epoch not in orders:
            orders.clear()  # keep one epoch's permutation (4 or 8 bytes per image)
            dtype = np.uint32 if total < 2**32 else np.int64
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(total).astype(dtype)
        return orders[epoch]

    def get(first, count):
        positions = np.arange(first * images_per_seq, (first + count) * images_per_seq)
        rows = np.empty_like(positions)
        for epoch in np.unique(positions // total):
            here = positions // total == epoch
            rows[here] = order(int(epoch))[positions[here] % total]
        source = np.searchsorted(starts, rows, side="right") - 1  # which file each row is in
        out = np.empty((len(rows), per_image), dtype=np.int64)
        for d in np.unique(source):
            here = source == d
            out[here] = datasets[d].tokens[rows[here] - starts[d]]
        return out.reshape(count, images_per_seq * per_image)

    return get


def main(argv=None):
    c = train.parse_config(argv, SETTINGS, __doc__)
    try:
        datasets, val = train.open_train_and_val(c)
        # the validation stream in another order: other images first
        train.train(c, image_sequences(datasets, c.images_per_seq, c.seed),
                    image_sequences(val, c.images_per_seq, c.seed + 1))
    except TrainingError as e:
        sys.exit(f"error: {e}")
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()
