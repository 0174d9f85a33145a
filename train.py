"""
The training loop both stages share (paper 2.2, 2.3): next-token prediction on token sequences,
AdamW with Table 8's schedule, gradient accumulation, checkpoints that resume exactly. pretrain.py
(stage 1, single images) and finetune.py (stage 2, 16-image sequences) are its entry points: each
brings its settings, its starting weights and its sequences, then calls train().

Read top to bottom: settings -> the learning rate and optimizer (Table 8) -> data -> train(), the
loop, then the steps it takes in the order it takes them. Where it runs (a CPU or GPU, DDP, FSDP2, a
TPU mesh) is distributed.py's concern: the loop calls its functions and never asks which.
"""
import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import distributed
import sharded_checkpoint
from checkpoint import (find_checkpoint, load_checkpoint, load_model, model_from_state,
                        save_checkpoint, save_hf)
from configs import MODEL_SIZES, STAGES, parse_settings
from data import load_tokens
from images import save_grid
from model import ModelArgs, Transformer, estimate_flops
from sample import generate
from vqgan import load_pretrained, tokens_to_images

# name: (default, help). An entry script adds its own and changes defaults; the stage's Table 8
# values (configs.STAGES) are added to these by parse_config.
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
    "vqgan": ("", "VQ-GAN (path or name for vqgan.load_pretrained) to draw the grid; default: "
                  "token-id pictures"),
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
                      "out_dir/latest names): weights, optimizer, step, RNG and data position"),
    "stop_at": (0, "end this run after this step (0: at max_steps), e.g. to fit a time limit; "
                   "--resume continues"),
    "export_hf": (True, "when max_steps is reached, write out_dir/hf in the Hugging Face LLaMA "
                        "layout"),
}


class TrainingError(Exception):
    """A problem the user can fix (data, settings, checkpoint, divergence): an entry script prints
    it and exits with 1."""


def parse_config(argv=None, settings=SETTINGS, description=None):
    """The settings plus the chosen stage's Table 8 values, each overridable as --key=value (or
    --key value)."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--stage", default=settings["stage"][0])
    stage = first.parse_known_args(argv)[0].stage
    if stage not in STAGES:
        sys.exit(f"error: --stage={stage} is not one of: {', '.join(STAGES)} (configs/__init__.py)")
    table = {**settings,
             **{k: (v, f"Table 8 value of stage {stage}") for k, v in STAGES[stage].items()}}
    c = parse_settings(table, argv, description)
    if c.size and c.size not in MODEL_SIZES:
        sys.exit(f"error: --size={c.size} is not one of: {', '.join(MODEL_SIZES)}")
    return c


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
# data: token files (data.py's contract) -> int64 sequences. A batch function get(first, count)
# returns sequences first .. first+count-1 of an endless, deterministic stream, so that a rank reads
# its own slice of each step's global batch and a resumed run continues with the very sequences it
# would have read.


def open_token_files(prefixes, c, flag="--data"):
    """Open comma-separated token files and check that they fit the stage."""
    datasets = []
    for prefix in [p for p in prefixes.split(",") if p]:
        try:
            data = load_tokens(prefix)
        except (OSError, ValueError, KeyError, TypeError) as e:  # missing, bad JSON, wrong size
            raise TrainingError(f"{flag}: cannot read the token files {prefix}.tokens / "
                                f"{prefix}.json ({e}); write them with tokenize_data.py") from e
        per_image = data.meta.get("tokens_per_image")
        if per_image != c.tokens_per_image:
            raise TrainingError(f"{flag}: {prefix} has {per_image} tokens per image but the "
                                f"stage expects {c.tokens_per_image}: pass "
                                f"--tokens_per_image={per_image} or use matching data")
        datasets.append(data)
    if not datasets:
        raise TrainingError(f"no {flag} given: pass {flag}=PREFIX, token files PREFIX.tokens + "
                            "PREFIX.json, which `python tokenize_data.py images --input PHOTOS "
                            "--vqgan VQ --out data/tok --name photos` makes from a folder of photos "
                            "(VQ: LVM's released tokenizer; videos and pairs: its video and pairs "
                            "commands), or start with the toy world: `python run_toy.py`")
    return datasets


def open_train_and_val(c):
    """--data and --val_data token files; without --val_data the validation loss is measured on
    training data."""
    datasets = open_token_files(c.data, c, "--data")
    if not c.val_data:
        print("note: no --val_data; the validation loss is measured on the training data")
        return datasets, datasets
    return datasets, open_token_files(c.val_data, c, "--val_data")


def micro_batches(tokens, accum):
    """[n, T] sequences -> accum micro-batches of inputs and targets. Targets are the inputs shifted
    left by one (next-token prediction); the last position, with no next token, gets -1 (ignored by
    the loss). Shapes stay [n / accum, T], so the loss is the paper's sum over m = 1 .. L-1 of -log
    p(z_m+1 | z_1..m), averaged."""
    targets = np.concatenate([tokens[:, 1:], np.full((len(tokens), 1), -1, dtype=np.int64)], axis=1)
    return np.split(tokens, accum), np.split(targets, accum)


def check_token_ids(tokens, vocab_size):
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise TrainingError(f"token id {tokens.max()} is outside the model's vocabulary "
                            f"(0..{vocab_size - 1}): the data was tokenized with a bigger "
                            "codebook; use the model's VQ-GAN or a matching --size")


# -----------------------------------------------------------------------------
# the loop


def train(c, get_batch, get_eval_batch, init=None, probe=None):
    """Train with settings c (parse_config). get_batch(first, count) / get_eval_batch(first, count)
    return int64 sequences [count, images_per_seq * tokens_per_image]. init: a Transformer whose
    weights to start from (stage 2) instead of random ones; probe(model) -> dict, if given, is
    logged at each evaluation (stage 2's in-context accuracy). Returns the metrics this run
    logged."""
    env, dtype = setup_device(c)
    out_dir = Path(c.out_dir)
    metrics_path = out_dir / "metrics.jsonl"
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = resume_checkpoint(out_dir) if c.resume else None
    args = model_args(c, ckpt, init)
    seq_len, accum, local_batch = batch_layout(c, args, env)

    torch.manual_seed(c.seed)  # the same initial weights in every process
    raw_model = Transformer(args)
    start = ckpt.get("model") if ckpt else init.state_dict() if init is not None else None
    if start is not None:  # whole weights, before they are split (a sharded checkpoint's: later)
        raw_model.load_state_dict(start)
    model = distributed.wrap_model(raw_model, env, c.compile)
    optimizer = configure_optimizer(raw_model, c.lr, c.weight_decay, (c.beta1, c.beta2),
                                    env.device_type)
    # seen: the sequences all ranks have read, the position in the data streams
    step, seen = resume(ckpt, raw_model, optimizer, env, metrics_path) if ckpt else (0, 0)
    last_saved = step if ckpt else None
    autocast = distributed.autocast(env, dtype)
    step_fn, eval_fn = distributed.trace(train_step, env), distributed.trace(eval_step, env)
    flops_per_token = 3 * estimate_flops(args, seq_len) / seq_len  # forward + backward (2x forward)
    peak = distributed.peak_flops(distributed.device_name(env))
    last = min(c.max_steps, c.stop_at or c.max_steps)
    if env.is_main:
        print(f"model: {raw_model.num_params() / 1e6:.1f}M parameters ({args}); device: "
              f"{env.num_devices} x {distributed.device_name(env)}, {env.parallel}, {dtype}; "
              f"batch: {c.batch_size} x {seq_len} tokens = {accum} accumulation x "
              f"{c.micro_batch_size} x {env.num_devices} devices; steps {step} -> {last} of "
              f"{c.max_steps}")
    metrics, vqgan, loss_sum, steps_since, t0 = [], None, 0.0, 0, time.time()
    while step < last:
        lr = learning_rate(step, c.lr, c.min_lr, c.warmup_steps, c.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens = get_batch(seen + env.rank * local_batch, local_batch)  # this rank's slice
        check_token_ids(tokens, args.vocab_size)
        inputs, targets = (distributed.to_device(a, env) for a in micro_batches(tokens, accum))
        loss_sum = loss_sum + step_fn(model, optimizer, inputs, targets, autocast, c.grad_clip)
        step, seen, steps_since = step + 1, seen + c.batch_size, steps_since + 1

        evaluating = step % c.eval_interval == 0 or step == last
        if not (evaluating or step % c.log_interval == 0):
            continue  # no waiting for the device between log lines
        dt = (time.time() - t0) / steps_since
        record = dict(step=step, loss=distributed.mean_over_ranks(loss_sum / steps_since, env),
                      lr=lr, tokens_per_s=c.batch_size * seq_len / dt, ms_per_step=dt * 1e3)
        record["mfu"] = (flops_per_token * record["tokens_per_s"] / (peak * env.num_devices) if peak
                         else None)
        if evaluating:
            record["val_loss"] = evaluate(model, eval_fn, get_eval_batch, autocast, c, env,
                                          args.vocab_size)
        check_finite(record, out_dir, last_saved)
        whole = None  # a whole copy of the weights on the main process, for the probe and the grid
        if evaluating and (probe or c.num_samples):
            model_state = distributed.full_model_state(raw_model, env)  # every rank takes part
            if env.is_main:
                whole = model_from_state(args, model_state, sample_device(env))
            if whole is not None and probe:
                record["in_context"] = probe(whole)
        log(record, metrics_path, env, c.max_steps)
        metrics.append(record)
        if evaluating:
            save(raw_model, optimizer, out_dir, env, last_saved, model_args=asdict(args),
                 step=step, data_position=seen, config=vars(c))
            if env.is_main:
                vqgan = save_samples(whole, get_eval_batch, c, out_dir / f"samples_{step:06d}.png",
                                     vqgan)
            last_saved = step
            distributed.barrier(env)
        loss_sum, steps_since, t0 = 0.0, 0, time.time()  # evaluating, saving: not training time

    if step >= c.max_steps and c.export_hf and env.is_main:
        export_hf(out_dir)
    return metrics


# -----------------------------------------------------------------------------
# the steps of the loop, in the order it takes them


def setup_device(c):
    """distributed.setup for --device / --parallel, and the compute dtype: bf16 autocast on
    accelerators, float32 on a CPU, unless --dtype says."""
    try:
        env = distributed.setup(c.device, c.parallel, c.xla_fsdp)
    except (ValueError, RuntimeError, ImportError) as e:
        raise TrainingError(str(e)) from e
    cpu = env.device_type == "cpu"
    return env, c.dtype if c.dtype != "auto" else ("float32" if cpu else "bfloat16")


def resume_checkpoint(out_dir):
    """out_dir's newest checkpoint: a ckpt.pt's whole dict, or a sharded one's small values (its
    tensors are read by resume(), each process its part)."""
    try:
        return load_checkpoint(out_dir)
    except (FileNotFoundError, ValueError) as e:
        raise TrainingError(f"{e} (--resume continues a run written to --out_dir)") from e


def model_args(c, ckpt, init):
    """The model to train: the checkpoint's when resuming (it must be the one asked for), else
    init's (stage 2), else --size's."""
    wanted = init.args if init is not None else ModelArgs(**MODEL_SIZES[c.size]) if c.size else None
    if ckpt is None:
        return wanted
    args = ModelArgs(**ckpt["model_args"])
    if wanted is not None and wanted != args:
        diff = ", ".join(f"{k}={v} (asked: {getattr(wanted, k)})"
                         for k, v in ckpt["model_args"].items() if getattr(wanted, k) != v)
        raise TrainingError(f"the checkpoint in {c.out_dir} holds a different model: {diff}; pass "
                            "the --size it was trained with or another --out_dir")
    return args


def batch_layout(c, args, env):
    """(tokens per sequence, accumulation steps, sequences this process reads per step): the global
    batch is micro_batch_size x devices x accumulation steps."""
    seq_len = c.images_per_seq * c.tokens_per_image
    if seq_len > args.max_seq_len:
        raise TrainingError(f"sequences of {seq_len} tokens exceed the model's max_seq_len "
                            f"{args.max_seq_len}")
    per_micro_step = c.micro_batch_size * env.num_devices
    if c.batch_size % per_micro_step:
        raise TrainingError(f"--batch_size={c.batch_size} is not a multiple of micro_batch_size x "
                            f"devices = {c.micro_batch_size} x {env.num_devices}; change one of "
                            "them")
    return seq_len, c.batch_size // per_micro_step, c.batch_size // env.world_size


def resume(ckpt, raw_model, optimizer, env, metrics_path):
    """Optimizer state and RNG from the checkpoint (and a sharded one's weights); metrics logged
    after it are dropped (they are redone). Returns (step, data position)."""
    if "shards" in ckpt:  # each process reads the part it holds, in whatever layout this run has
        try:
            sharded_checkpoint.load(ckpt["shards"], raw_model, optimizer, env)
        except ValueError as e:
            raise TrainingError(f"{e} (--resume continues a run written to --out_dir)") from e
    else:  # whole tensors, split like the parameters
        distributed.load_optimizer_state(optimizer, ckpt["optimizer"], env)
    distributed.set_rng_state(ckpt["rng"], env)
    if env.is_main and metrics_path.exists():
        kept = [line for line in metrics_path.read_text().splitlines()
                if json.loads(line)["step"] <= ckpt["step"]]
        metrics_path.write_text("".join(line + "\n" for line in kept))
    return ckpt["step"], ckpt["data_position"]


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


def evaluate(model, eval_fn, get_eval_batch, autocast, c, env, vocab_size):
    """The validation loss: eval_iters micro-batches per device of the held-out stream, averaged
    over ranks."""
    local = c.micro_batch_size * env.local_devices
    total = 0.0
    for i in range(c.eval_iters):
        tokens = get_eval_batch((i * env.world_size + env.rank) * local, local)
        check_token_ids(tokens, vocab_size)
        (x,), (y,) = (distributed.to_device(a, env) for a in micro_batches(tokens, 1))
        total = total + eval_fn(model, x, y, autocast)
    return distributed.mean_over_ranks(total / c.eval_iters, env)


def check_finite(record, out_dir, last_saved):
    if not all(math.isfinite(record[k]) for k in ("loss", "val_loss") if k in record):
        raise TrainingError(f"the loss became {record['loss']} (validation "
                            f"{record.get('val_loss')}) by step {record['step']}: training "
                            f"diverged and stops here; {last_good(out_dir, last_saved)}. Lower "
                            "--lr or --grad_clip, or lengthen --warmup_steps, then --resume")


def last_good(out_dir, last_saved):
    """What a stopped run leaves to --resume from."""
    if last_saved is None:
        return "no checkpoint was written"
    return f"the last good checkpoint {find_checkpoint(out_dir)} (step {last_saved}) is untouched"


def log(record, path, env, max_steps):
    """A progress line (and the in-context accuracy, when probed); the record appended to
    metrics.jsonl. Main process only."""
    if not env.is_main:
        return
    mfu = f"{100 * record['mfu']:.1f}%" if record["mfu"] else "n/a"
    val = f" | val {record['val_loss']:.4f}" if "val_loss" in record else ""
    print(f"step {record['step']}/{max_steps} | loss {record['loss']:.4f}{val} | lr "
          f"{record['lr']:.2e} | {record['tokens_per_s'] / 1e3:.1f}k tok/s | mfu {mfu} | "
          f"{record['ms_per_step']:.0f} ms/step")
    for name, accuracy in record.get("in_context", {}).items():
        print(f"  in-context, {name}: answer tokens right (greedy) after "
              + ", ".join(f"{k} pairs {v:.0f}%" for k, v in accuracy.items()))
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def save(raw_model, optimizer, out_dir, env, last_saved, **meta):
    """This step's checkpoint (meta: step, data_position, model_args, config), of the kind the
    layout calls for: shards written by every process where the weights are split (FSDP2, SPMD:
    nothing is gathered), else one ckpt.pt written by the main process. Every process calls it. A
    save that fails (a full disk) stops training with one line and leaves the previous checkpoint
    as it was."""
    try:
        if distributed.sharded(env):
            sharded_checkpoint.save(out_dir, raw_model, optimizer, meta, env)
            return
        model_state, optim_state = distributed.full_state(raw_model, optimizer, env)
        rng = distributed.rng_states(env)
        if env.is_main:
            save_checkpoint(out_dir / "ckpt.pt", dict(model=model_state, optimizer=optim_state,
                                                      rng=rng, **meta))
            sharded_checkpoint.remove(out_dir)  # an earlier FSDP2 run's, now older than ckpt.pt
    except OSError as e:
        raise TrainingError(f"could not save the checkpoint of step {meta['step']} in {out_dir} "
                            f"({type(e).__name__}: {e}); {last_good(out_dir, last_saved)}. Free "
                            "disk space (or pass another --out_dir), then --resume") from e


def sample_device(env):
    """Sampling runs on the main process with a whole copy of the model: on its GPU, or on the
    host."""
    return env.device if env.device_type == "cuda" else torch.device("cpu")


def save_samples(model, get_eval_batch, c, path, vqgan):
    """The sample grid of an evaluation (c.num_samples rows, none if 0); returns the VQ-GAN that
    draws it, loaded the first time."""
    if not c.num_samples:
        return vqgan
    if c.vqgan and vqgan is None:
        vqgan = load_pretrained(c.vqgan, device=model.output.weight.device)
    save_sample_grid(model, get_eval_batch(0, c.num_samples), c, path, vqgan)
    return vqgan


def save_sample_grid(model, tokens, c, path, vqgan=None):
    """The model completes the last image of a few validation sequences from everything before it
    plus its top quarter (there is no start token, so some of the image is given). One row per
    sequence: up to 3 images before the last, the true last image, the model's completion."""
    S = c.tokens_per_image
    device = model.output.weight.device
    prompt = torch.from_numpy(tokens[:, :tokens.shape[1] - S + S // 4]).to(device)
    generator = torch.Generator(device).manual_seed(c.seed)  # the same draw each time: comparable
    codebook = vqgan.config["num_embeddings"] if vqgan is not None else None
    out = generate(model, prompt, S - S // 4, temperature=1.0, top_k=100, codebook_size=codebook,
                   generator=generator, tokens_per_image=S).cpu()
    shown = torch.cat([torch.from_numpy(tokens[:, -min(c.images_per_seq, 4) * S:]), out[:, -S:]], 1)
    if vqgan is not None:
        images = tokens_to_images(vqgan, shown, S).cpu()
    else:
        images = token_pictures(shown, S, model.args.vocab_size)
    save_grid([list(row) for row in images], path)


def token_pictures(tokens, tokens_per_image, vocab_size):
    """Without a VQ-GAN: each image's token ids as a square of colours (a fixed random colour per
    id)."""
    side = math.isqrt(tokens_per_image)
    colours = np.random.default_rng(0).integers(0, 256, (vocab_size, 3), dtype=np.uint8)
    palette = torch.from_numpy(colours)
    pictures = palette[tokens.reshape(tokens.shape[0], -1, side, side)]  # [B, n, side, side, 3]
    return pictures.permute(0, 1, 4, 2, 3)


def export_hf(out_dir):
    """At the end of training: the final checkpoint's weights in the Hugging Face LLaMA layout, in
    out_dir/hf. The main process reads them from disk, so a sharded run gathers nothing."""
    save_hf(load_model(out_dir), out_dir / "hf")
    print(f"exported the final model to {out_dir / 'hf'} (Hugging Face LlamaForCausalLM layout)")
