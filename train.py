"""
The training loop both stages share (paper 2.2, 2.3): next-token prediction on token sequences,
AdamW with Table 8's schedule, gradient accumulation. pretrain.py (stage 1, single images) and
finetune.py (stage 2, 16-image sequences) each bring their settings, their starting weights and
their data streams (data.py), then call train().

Read top to bottom: the settings -> Table 8's schedule and optimizer -> the batch -> train(), the
loop -> the optimizer step and the validation loss. The loop calls the machinery beside it by name
and never asks where it runs: infra/distributed.py (a CPU or GPU, DDP, FSDP2, a TPU mesh),
infra/checkpoint.py (resume, save, export), infra/progress.py (the log, the sample grid).
"""
import math

import numpy as np
import torch

from infra import checkpoint, distributed, progress
from infra.settings import TrainingError
from model import Transformer, estimate_flops

# name: (default, help). An entry script adds its own and changes defaults; the stage's Table 8
# values (configs.STAGES) are added to these by infra.settings.parse_config.
SETTINGS = {
    "size": ("300M", "model size: a key of configs.MODEL_SIZES"),
    "stage": ("pretrain", "optimisation defaults: a key of configs.STAGES (Table 8), e.g. "
                          "pretrain-toy"),
    "data": ("", "training token files (tokenize_data.py), comma-separated path prefixes: data/x "
                 "for data/x.tokens"),
    "val_data": ("", "held-out token files for the validation loss and the sample grid "
                     "(default: --data)"),
    "out_dir": ("out/pretrain", "checkpoint, metrics.jsonl, sample grids and the final Hugging "
                                "Face export"),
    "micro_batch_size": (32, "sequences per device per forward pass; batch_size is reached by "
                             "accumulation"),
    "log_interval": (10, "steps between progress lines (each waits for the device)"),
    "eval_interval": (1000, "steps between validation loss, sample grid and checkpoint"),
    "eval_iters": (20, "micro-batches per device for the validation loss"),
    "num_samples": (8, "validation images the model completes in each sample grid (0: no grid)"),
    "vqgan": ("", "VQ-GAN (path or name for vqgan_checkpoint.load_pretrained) to draw the grid; "
                  "default: token-id pictures"),
    "seed": (1337, "seeds the initial weights, the data order and the sample grid"),
    "device": ("auto", "cpu | cuda | xla | auto (a GPU if there is one, XLA when PJRT_DEVICE is "
                       "set, else cpu)"),
    "dtype": ("auto", "float32 | bfloat16 (autocast) | auto (bfloat16 on GPU and TPU, float32 on "
                      "CPU)"),
    "compile": (True, "torch.compile the model (GPU only)"),
    "parallel": ("ddp", "under torchrun: ddp (a replica per GPU) or fsdp (fully_shard, for models "
                        "too big to copy)"),
    "xla_fsdp": (0, "XLA: devices along the mesh's fsdp axis (0: all); the others form its data "
                    "axis"),
    "resume": (False, "continue from out_dir's checkpoint (ckpt.pt, or the sharded folder "
                      "out_dir/latest names): weights, optimizer, step, RNG and data position (a "
                      "run torchrun restarts continues from its own without it)"),
    "stop_at": (0, "end this run after this step (0: at max_steps), e.g. to fit a time limit; "
                   "--resume continues"),
    "export_hf": (True, "when max_steps is reached, write out_dir/hf in the Hugging Face LLaMA "
                        "layout"),
}


# -----------------------------------------------------------------------------
# Table 8: the optimizer and its schedule


def learning_rate(step, lr, min_lr, warmup_steps, decay_steps):
    """Table 8: linear warm-up to lr over warmup_steps, then cosine decay to min_lr at decay_steps
    (held after)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def configure_optimizer(model, lr, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu"):
    """Table 8: AdamW (0.9, 0.95), weight decay 0.1 on matrices and embeddings, none on RMSNorm
    gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device_type == "cuda"  # one kernel for all parameters where available
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused)


# -----------------------------------------------------------------------------
# the batch: data.py's streams hand out sequences by number (the batch contract, at its end)


def batch_layout(config, args, env):
    """(accumulation steps, sequences this process reads per step): the global batch of
    batch_size sequences is micro_batch_size x devices x accumulation steps."""
    seq_len = config.images_per_seq * config.tokens_per_image
    if seq_len > args.max_seq_len:
        raise TrainingError(f"sequences of {seq_len} tokens exceed the model's max_seq_len "
                            f"{args.max_seq_len}")
    per_micro_step = config.micro_batch_size * env.num_devices
    if config.batch_size % per_micro_step:
        raise TrainingError(f"--batch_size={config.batch_size} is not a multiple of "
                            f"micro_batch_size x devices = {config.micro_batch_size} x "
                            f"{env.num_devices}; change one of them")
    return config.batch_size // per_micro_step, config.batch_size // env.world_size


def rank_batch(stream, position, count, env, vocab_size):
    """This process's slice of a batch that starts at the data position: sequences
    position + rank * count .. + count - 1, with every token id inside the model's vocabulary."""
    tokens = stream(position + env.rank * count, count)
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise TrainingError(f"token id {tokens.max()} is outside the model's vocabulary "
                            f"(0..{vocab_size - 1}): the data was tokenized with a bigger "
                            "codebook; use the model's VQ-GAN or a matching --size")
    return tokens


def micro_batches(tokens, accum):
    """[n, T] sequences -> accum micro-batches of inputs and targets. Targets are the inputs shifted
    left by one (next-token prediction); the last position, with no next token, gets -1 (ignored by
    the loss). Shapes stay [n / accum, T], so the loss is the paper's sum over m = 1 .. L-1 of -log
    p(z_m+1 | z_1..m), averaged."""
    targets = np.concatenate([tokens[:, 1:], np.full((len(tokens), 1), -1, dtype=np.int64)], axis=1)
    return np.split(tokens, accum), np.split(targets, accum)


# -----------------------------------------------------------------------------
# the loop


def train(config, stream, eval_stream, init=None, probe=None):
    """Train with config (infra.settings.parse_config) on stream, measuring the validation loss on
    eval_stream (data.py's streams). init: a Transformer to start from (stage 2) instead of random
    weights; probe(model) -> dict, logged at each evaluation (stage 2's in-context check). Returns
    the records it logged."""
    env = distributed.setup_run(config)  # the device, the other processes, the compute dtype
    saved = checkpoint.resume_checkpoint(config)  # --resume, or torchrun restarted this run
    args = checkpoint.model_args(config, saved, init)
    accum, rank_count = batch_layout(config, args, env)
    torch.manual_seed(config.seed)  # the same initial weights in every process
    model = Transformer(args)
    checkpoint.load_start(model, saved, init)  # stage 2: stage 1's weights; resuming: ckpt.pt's
    parallel_model = distributed.wrap_model(model, env, config.compile)
    optimizer = configure_optimizer(model, config.lr, config.weight_decay,
                                    (config.beta1, config.beta2), env.device_type)
    step, position = (checkpoint.resume(saved, model, optimizer, env, config.out_dir) if saved
                      else (0, 0))  # position: how many sequences all processes have read
    saved_step = step if saved else None
    step_fn, eval_fn = distributed.trace(train_step, env), distributed.trace(eval_step, env)
    last = min(config.max_steps, config.stop_at or config.max_steps)
    log = progress.Log(config, env, model, step, last)
    while step < last:
        lr = learning_rate(step, config.lr, config.min_lr, config.warmup_steps, config.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens = rank_batch(stream, position, rank_count, env, args.vocab_size)
        inputs, targets = (distributed.to_device(a, env) for a in micro_batches(tokens, accum))
        log.add(step_fn(parallel_model, optimizer, inputs, targets, env.autocast, config.grad_clip))
        step, position = step + 1, position + config.batch_size
        evaluating = step % config.eval_interval == 0 or step == last
        if not (evaluating or step % config.log_interval == 0):
            continue  # no waiting for the device between log lines
        record = log.measure(step, lr)  # the mean loss since the last line, tokens/s, MFU
        if evaluating:
            record["val_loss"] = evaluate(parallel_model, eval_fn, eval_stream, config, env,
                                          args.vocab_size)
        progress.check_finite(record, config.out_dir, saved_step)  # before a save overwrites
        drawn = evaluating and (probe or config.num_samples)  # the probe, the sample grid
        model_copy = progress.whole_model(model, env) if drawn else None  # on the main process
        if probe and model_copy is not None:
            record["in_context"] = probe(model_copy)
        log.write(record)  # line and metrics.jsonl before the save: a kill after it keeps them
        if evaluating:
            saved_step = checkpoint.save(model, optimizer, env, config, step, position, saved_step)
            log.sample_grid(model_copy, eval_stream, step)
            log.restart_clock()  # saving and drawing are not training time
    if step >= config.max_steps and config.export_hf and env.is_main:
        checkpoint.export_hf(config.out_dir)
    return log.records


# -----------------------------------------------------------------------------
# the steps of the loop


def train_step(model, optimizer, inputs, targets, autocast, grad_clip):
    """One optimizer step: the gradients of every micro-batch accumulated, their norm clipped, one
    update. Returns the mean loss as a device scalar (reading it would wait for the device)."""
    total = 0.0
    for i, (x, y) in enumerate(zip(inputs, targets)):
        distributed.set_gradient_sync(model, i == len(inputs) - 1)  # reduce across ranks once
        with autocast:
            _, loss = model(x, y)
        (loss / len(inputs)).backward()
        total = total + loss.detach()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / len(inputs)


def eval_step(model, x, y, autocast):
    with torch.no_grad(), autocast:
        return model(x, y)[1]


def evaluate(model, eval_fn, eval_stream, config, env, vocab_size):
    """The validation loss: eval_iters micro-batches per device of the held-out stream, averaged
    over processes."""
    count = config.micro_batch_size * env.local_devices
    total = 0.0
    for i in range(config.eval_iters):
        tokens = rank_batch(eval_stream, i * env.world_size * count, count, env, vocab_size)
        (x,), (y,) = (distributed.to_device(a, env) for a in micro_batches(tokens, 1))
        total = total + eval_fn(model, x, y, env.autocast)
    return distributed.mean_over_ranks(total / config.eval_iters, env)
