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
atomically; with --parallel=fsdp or on XLA, sharded: ckpt-STEP/, which out_dir/latest names;
--resume continues from it, and a group torchrun --max-restarts restarts does so by itself),
metrics.jsonl, samples_<step>.png and, at the end, hf/ (Hugging Face LLaMA layout).
--images_per_seq=16 trains on LVM's random 16-image sequences instead (the baseline of Table 4).
"""
import sys

import data
import train
from infra import distributed
from infra.settings import TrainingError, parse_config

SETTINGS = train.SETTINGS  # stage 1's defaults are the shared ones: --stage=pretrain, --size=300M


def main(argv=None):
    config = parse_config(argv, SETTINGS, __doc__)
    try:
        datasets, val = data.open_train_and_val(config.data, config.val_data,
                                                config.tokens_per_image)
        # the validation stream in another order: other images first
        train.train(config, data.image_stream(datasets, config.images_per_seq, config.seed),
                    data.image_stream(val, config.images_per_seq, config.seed + 1))
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
