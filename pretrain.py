"""
Stage 1 of LVM-Lite (paper 2.2): next-token training on single images of 256 VQ-GAN tokens. The loop
below also runs stage 2 (finetune.py), which only brings other defaults, the stage-1 weights and its
own sequences.

    python pretrain.py --size=300M --data=data/laion/train --val_data=data/laion/val \\
        --micro_batch_size=64
    torchrun --standalone --nproc_per_node=8 pretrain.py --size=1B --data=... --parallel=fsdp
    PJRT_DEVICE=TPU python pretrain.py --device=xla --size=3B --data=... --micro_batch_size=16
    # the toy world, on a CPU
    python pretrain.py --size=tiny --stage=pretrain-toy --data=data/toy_tokens/train_images \\
        --val_data=data/toy_tokens/val_images --out_dir=out/toy-pretrain --device=cpu

Every setting below and every Table 8 value of the stage (configs.STAGES) can be changed as
--key=value. The global batch (--batch_size sequences) = micro_batch_size x devices x
gradient-accumulation steps. Output in --out_dir: ckpt.pt (every eval_interval steps, written
atomically; --resume continues from it), metrics.jsonl, samples_<step>.png and, at the end, hf/
(Hugging Face LLaMA layout).

Read top to bottom: settings -> learning rate -> data -> checkpoints -> sample grid -> the training
loop -> main.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import distributed
from configs import MODEL_SIZES, STAGES, parse_settings
from data import load_tokens
from model import (ModelArgs, Transformer, configure_optimizer, estimate_flops, learning_rate,
                   save_hf)

# name: (default, help). The stage's Table 8 values (configs.STAGES) are added to these.
SETTINGS = {
    "size": ("300M", "model size: a key of configs.MODEL_SIZES"),
    "stage": ("pretrain",
              "optimisation defaults: a key of configs.STAGES (Table 8), e.g. pretrain-toy"),
    "data": ("", "training token files (tokenize_data.py), comma-separated path prefixes: data/x "
                 "for data/x.tokens"),
    "val_data": ("", "held-out token files for the validation loss and the sample grid "
                     "(default: --data)"),
    "out_dir": ("out/pretrain",
                "checkpoint, metrics.jsonl, sample grids and the final Hugging Face export"),
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
    "dtype": ("auto",
              "float32 | bfloat16 (autocast) | auto (bfloat16 on GPU and TPU, float32 on CPU)"),
    "compile": (True, "torch.compile the model (GPU only)"),
    "parallel": ("ddp", "under torchrun: ddp (a replica per GPU) or fsdp (fully_shard, for models "
                        "too big to copy)"),
    "xla_fsdp": (0,
                 "XLA: devices along the mesh's fsdp axis (0: all); the others form its data axis"),
    "resume": (False,
               "continue from out_dir/ckpt.pt: weights, optimizer, step, RNG and data position"),
    "stop_at": (0, "end this run after this step (0: at max_steps), e.g. to fit a time limit; "
                   "--resume continues"),
    "export_hf": (True,
                  "when max_steps is reached, write out_dir/hf in the Hugging Face LLaMA layout"),
}


class TrainingError(Exception):
    """A problem the user can fix (data, settings, checkpoint, divergence): main() prints it and
    exits with 1."""


def parse_config(argv=None, settings=SETTINGS, description=__doc__):
    """The settings plus the chosen stage's Table 8 values, each overridable as --key=value
    (or --key value)."""
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
        # missing files, bad JSON, wrong size
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TrainingError(f"{flag}: cannot read the token files {prefix}.tokens / "
                                f"{prefix}.json ({e}); write them with tokenize_data.py") from e
        per_image = data.meta.get("tokens_per_image")
        if per_image != c.tokens_per_image:
            raise TrainingError(f"{flag}: {prefix} has {per_image} tokens per image but the "
                                f"stage expects {c.tokens_per_image}: pass "
                                f"--tokens_per_image={per_image} or use matching data")
        datasets.append(data)
    if not datasets:
        raise TrainingError(f"no {flag} given: pass {flag}=PREFIX, "
                            "token files PREFIX.tokens + PREFIX.json")
    return datasets


def open_train_and_val(c):
    """--data and --val_data token files; without --val_data the validation loss is measured on
    training data."""
    datasets = open_token_files(c.data, c, "--data")
    if not c.val_data:
        print("note: no --val_data; the validation loss is measured on the training data")
        return datasets, datasets
    return datasets, open_token_files(c.val_data, c, "--val_data")


def image_sequences(datasets, images_per_seq, seed):
    """Stage 1 batches: sequence i holds images i*n .. i*n+n-1 of a random order of all images,
    drawn anew each epoch. Every image is read once per epoch, and no two ranks (different i) read
    the same image in a step. images_per_seq > 1 gives LVM's random 16-image sequences
    (the baseline of Table 4)."""
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


def micro_batches(tokens, accum):
    """[n, T] sequences -> accum micro-batches of inputs and targets. Targets are the inputs shifted
    left by one (next-token prediction); the last position, with no next token, gets -1
    (ignored by the loss). Shapes stay [n / accum, T], so the loss is the paper's sum over m = 1 ..
    L-1 of -log p(z_m+1 | z_1..m), averaged."""
    targets = np.concatenate([tokens[:, 1:], np.full((len(tokens), 1), -1, dtype=np.int64)], axis=1)
    return np.split(tokens, accum), np.split(targets, accum)


def check_token_ids(tokens, vocab_size):
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise TrainingError(f"token id {tokens.max()} is outside the model's vocabulary "
                            f"(0..{vocab_size - 1}): the data was tokenized with a bigger "
                            "codebook; use the model's VQ-GAN or a matching --size")


# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path, checkpoint):
    """Write to a temporary file, then rename over the old one: a crash while saving leaves the
    previous checkpoint intact (the rename is atomic)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    path = Path(path)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.is_file():
        raise TrainingError(f"no checkpoint at {path}: check --out_dir (--resume continues a run "
                            "written there)")
    try:
        # a checkpoint must never run code
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainingError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    missing = {"model", "model_args", "optimizer", "step", "data_position"} - set(ckpt)
    if missing:
        raise TrainingError(f"{path} is not a checkpoint of pretrain.py: it lacks "
                            f"{sorted(missing)}")
    return ckpt


def model_from_state(args, state, device="cpu"):
    """A plain Transformer holding whole weights (for sampling and export; the training copy may be
    sharded)."""
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(state, assign=True)
    model.init_rope()
    return model.to(device).eval()


# -----------------------------------------------------------------------------
# sample grid: people would rather look than read


def token_pictures(tokens, tokens_per_image, vocab_size):
    """Without a VQ-GAN: each image's token ids as a square of colours (one fixed random colour per
    id)."""
    side = math.isqrt(tokens_per_image)
    palette = torch.from_numpy(
        np.random.default_rng(0).integers(0, 256, (vocab_size, 3), dtype=np.uint8))
    pictures = palette[tokens.reshape(tokens.shape[0], -1, side, side)]  # [B, n, side, side, 3]
    return pictures.permute(0, 1, 4, 2, 3)


def save_sample_grid(model, tokens, c, path, vqgan=None):
    """The model completes the last image of a few validation sequences from everything before it
    plus its top quarter (there is no start token, so some of the image is given). One row per
    sequence: up to 3 images before the last, the true last image, the model's completion."""
    from sample import generate, save_grid, tokens_to_images
    S = c.tokens_per_image
    device = model.output.weight.device
    prompt = torch.from_numpy(tokens[:, :tokens.shape[1] - S + S // 4]).to(device)
    # the same draw at every step: comparable grids
    generator = torch.Generator(device).manual_seed(c.seed)
    codebook = vqgan.config["num_embeddings"] if vqgan is not None else None
    out = generate(model, prompt, S - S // 4, temperature=1.0, top_k=100, codebook_size=codebook,
                   generator=generator, tokens_per_image=S).cpu()
    shown = torch.cat([torch.from_numpy(tokens[:, -min(c.images_per_seq, 4) * S:]),
                       out[:, -S:]], dim=1)
    if vqgan is not None:
        with torch.no_grad():
            images = tokens_to_images(vqgan, shown.to(next(vqgan.parameters()).device), S).cpu()
    else:
        images = token_pictures(shown, S, model.args.vocab_size)
    save_grid([list(row) for row in images], path)


# -----------------------------------------------------------------------------
# the training loop, shared by both stages


def train(c, get_batch, get_eval_batch, init=None, probe=None):
    """Train with settings c. get_batch(first, count) / get_eval_batch(first, count) return int64
    sequences [count, images_per_seq * tokens_per_image]; init = (ModelArgs, state_dict) starts from
    given weights (stage 2) instead of random ones; probe(model) -> dict, if given, is logged at
    each evaluation (stage 2's in-context accuracy). Returns the logged metrics of this run."""
    try:
        env = distributed.setup(c.device, c.parallel, c.xla_fsdp)
    except (ValueError, RuntimeError, ImportError) as e:
        raise TrainingError(str(e)) from e
    dtype = c.dtype if c.dtype != "auto" else ("float32" if env.device_type == "cpu"
                                               else "bfloat16")
    say = print if env.is_main else (lambda *a, **k: None)
    out_dir, metrics = Path(c.out_dir), []
    ckpt_path, metrics_path = out_dir / "ckpt.pt", out_dir / "metrics.jsonl"
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    # the model: resumed, handed over (stage 2 starts from stage 1), or new
    ckpt = load_checkpoint(ckpt_path) if c.resume else None
    wanted = init[0] if init else ModelArgs(**MODEL_SIZES[c.size]) if c.size else None
    args = ModelArgs(**ckpt["model_args"]) if ckpt else wanted
    if ckpt and wanted and wanted != args:
        diff = ", ".join(f"{k}={v} (asked: {getattr(wanted, k)})"
                         for k, v in ckpt["model_args"].items()
                         if getattr(wanted, k) != v)
        raise TrainingError(f"{ckpt_path} holds a different model: {diff}; pass the --size it was "
                            "trained with or another --out_dir")
    seq_len = c.images_per_seq * c.tokens_per_image
    if seq_len > args.max_seq_len:
        raise TrainingError(f"sequences of {seq_len} tokens exceed the model's max_seq_len "
                            f"{args.max_seq_len}")
    per_micro_step = c.micro_batch_size * env.num_devices
    if c.batch_size % per_micro_step:
        raise TrainingError(f"--batch_size={c.batch_size} is not a multiple of micro_batch_size x "
                            f"devices = {c.micro_batch_size} x {env.num_devices}; "
                            "change one of them")
    accum = c.batch_size // per_micro_step  # gradient-accumulation steps
    local_batch = c.batch_size // env.world_size  # sequences this process reads per step

    torch.manual_seed(c.seed)  # the same initial weights in every process
    raw_model = Transformer(args)
    if ckpt or init:
        raw_model.load_state_dict(ckpt["model"] if ckpt else init[1])
    model = distributed.wrap_model(raw_model, env, c.compile)
    optimizer = configure_optimizer(raw_model, c.lr, c.weight_decay, (c.beta1, c.beta2),
                                    env.device_type)
    step, seen, last_saved = 0, 0, None  # seen: sequences consumed by all ranks, the data position
    if ckpt:
        distributed.load_optimizer_state(optimizer, ckpt["optimizer"], env)
        distributed.set_rng_state(ckpt["rng"], env)
        step, seen, last_saved = ckpt["step"], ckpt["data_position"], ckpt["step"]
        # forget what was logged after the checkpoint: it is redone
        if env.is_main and metrics_path.exists():
            kept = [line for line in metrics_path.read_text().splitlines()
                    if json.loads(line)["step"] <= step]
            metrics_path.write_text("".join(line + "\n" for line in kept))
    autocast = distributed.autocast(env, dtype)

    def train_step(inputs, targets):
        """One optimizer step: accumulate the gradients of all micro-batches, clip their norm,
        update."""
        total = 0.0
        for i in range(accum):
            # reduce across ranks once per step
            distributed.set_gradient_sync(model, i == accum - 1)
            with autocast:
                _, loss = model(inputs[i], targets[i])
            (loss / accum).backward()
            total = total + loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total / accum

    def eval_step(inputs, targets):
        with torch.no_grad(), autocast:
            return model(inputs[0], targets[0])[1]

    train_step, eval_step = distributed.trace(train_step, env), distributed.trace(eval_step, env)
    local_micro = c.micro_batch_size * env.local_devices

    def evaluate():
        total = 0.0
        for i in range(c.eval_iters):
            tokens = get_eval_batch((i * env.world_size + env.rank) * local_micro, local_micro)
            check_token_ids(tokens, args.vocab_size)
            inputs, targets = micro_batches(tokens, 1)
            total = total + eval_step(*[distributed.to_device(a, env) for a in (inputs, targets)])
        return distributed.mean_over_ranks(total / c.eval_iters, env)

    # forward + backward (twice the forward)
    flops_per_token = 3 * estimate_flops(args, seq_len) / seq_len
    name = distributed.device_name(env)
    peak = distributed.peak_flops(name)
    last = min(c.max_steps, c.stop_at or c.max_steps)
    say(f"model: {raw_model.num_params() / 1e6:.1f}M parameters ({args}); device: "
        f"{env.num_devices} x {name}, {env.parallel}, {dtype}; batch: {c.batch_size} x {seq_len} "
        f"tokens = {accum} accumulation x {c.micro_batch_size} x {env.num_devices} devices; steps "
        f"{step} -> {last} of {c.max_steps}")
    vqgan = None
    loss_sum, steps_since, t0 = 0.0, 0, time.time()
    while step < last:
        lr = learning_rate(step, c.lr, c.min_lr, c.warmup_steps, c.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens = get_batch(seen + env.rank * local_batch, local_batch)
        check_token_ids(tokens, args.vocab_size)
        inputs, targets = micro_batches(tokens, accum)
        loss_sum = loss_sum + train_step(*[distributed.to_device(a, env)
                                           for a in (inputs, targets)])
        step, seen, steps_since = step + 1, seen + c.batch_size, steps_since + 1

        evaluating = step % c.eval_interval == 0 or step == last
        if not (evaluating or step % c.log_interval == 0):
            continue  # no waiting for the device between log lines
        loss = distributed.mean_over_ranks(loss_sum / steps_since, env)
        dt = (time.time() - t0) / steps_since
        record = dict(step=step, loss=loss, lr=lr, tokens_per_s=c.batch_size * seq_len / dt,
                      ms_per_step=dt * 1e3)
        record["mfu"] = (flops_per_token * record["tokens_per_s"] / (peak * env.num_devices) if peak
                         else None)
        if evaluating:
            record["val_loss"] = evaluate()
        if not all(math.isfinite(record[k]) for k in ("loss", "val_loss") if k in record):
            kept = (f"the last good checkpoint {ckpt_path} (step {last_saved}) is untouched"
                    if last_saved else "no checkpoint was written")
            raise TrainingError(f"the loss became {record['loss']} (validation "
                                f"{record.get('val_loss')}) by step {step}: training diverged and "
                                f"stops here; {kept}. Lower --lr or --grad_clip, or lengthen "
                                "--warmup_steps, then --resume")
        # a plain whole-weights copy on the main process, for the probe and the sample grid
        whole = None
        if evaluating:
            # every rank takes part
            model_state, optim_state = distributed.full_state(raw_model, optimizer, env)
            if env.is_main and (probe or c.num_samples):
                whole = model_from_state(args, model_state, sample_device(env))
            if whole is not None and probe:
                record["in_context"] = probe(whole)
        metrics.append(record)
        mfu = f"{100 * record['mfu']:.1f}%" if peak else "n/a"
        val = f" | val {record['val_loss']:.4f}" if evaluating else ""
        say(f"step {step}/{c.max_steps} | loss {loss:.4f}{val} | lr {lr:.2e} | "
            f"{record['tokens_per_s'] / 1e3:.1f}k tok/s | mfu {mfu} | {dt * 1e3:.0f} ms/step")
        for name, accuracy in record.get("in_context", {}).items():
            say(f"  in-context, {name}: answer tokens right (greedy) after " +
                ", ".join(f"{k} pairs {v:.0f}%" for k, v in accuracy.items()))
        if env.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        loss_sum, steps_since, t0 = 0.0, 0, time.time()
        if not evaluating:
            continue

        if env.is_main:
            save_checkpoint(ckpt_path, dict(model=model_state, optimizer=optim_state,
                                            model_args=asdict(args), step=step, data_position=seen,
                                            config=vars(c), rng=distributed.rng_state(env)))
            if c.num_samples:
                if c.vqgan and vqgan is None:
                    import vqgan as vqgan_module
                    vqgan = vqgan_module.load_pretrained(c.vqgan, device=sample_device(env))
                save_sample_grid(whole, get_eval_batch(0, c.num_samples), c,
                                 out_dir / f"samples_{step:06d}.png", vqgan)
        last_saved = step
        distributed.barrier(env)
        t0 = time.time()  # the time spent evaluating and saving is not training time

    if step >= c.max_steps and c.export_hf:
        model_state, _ = distributed.full_state(raw_model, optimizer, env)
        if env.is_main:
            save_hf(model_from_state(args, model_state), out_dir / "hf")
            say(f"exported the final model to {out_dir / 'hf'} (Hugging Face "
                "LlamaForCausalLM layout)")
    return metrics


def sample_device(env):
    """Sampling runs on the main process with a whole copy of the model: on its GPU, or on the host
    CPU."""
    return env.device if env.device_type == "cuda" else torch.device("cpu")


def main(argv=None):
    c = parse_config(argv)
    try:
        datasets, val = open_train_and_val(c)
        train(c, image_sequences(datasets, c.images_per_seq, c.seed),
              # another order: other images first
              image_sequences(val, c.images_per_seq, c.seed + 1))
    except TrainingError as e:
        sys.exit(f"error: {e}")
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()
