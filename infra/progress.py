"""
What a training run shows as it goes (train.py calls it by name): a progress line every
log_interval steps (loss, learning rate, tokens/s, MFU), each record appended to
out_dir/metrics.jsonl, a stop with one line when the loss is no longer finite, and at each
evaluation a sample grid: the model completes a few held-out images.

    log = Log(config, env, model, step, last)   # prints what is trained, where, in what batches
    log.add(loss)                               # every step (a device scalar: nothing waits)
    record = log.measure(step, lr)              # at a log step: the mean loss since the last one
    log.write(record)                           # the line and metrics.jsonl; the clock restarts

Every process calls these; the main process alone prints and writes.
"""
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from infra import distributed
from infra.checkpoint import last_good, model_from_state
from infra.images import save_grid
from infra.settings import TrainingError
from infra.vqgan_checkpoint import load_pretrained
from model import estimate_flops
from sample import generate
from vqgan import tokens_to_images


class Log:
    def __init__(self, config, env, model, step, last):
        self.config, self.env, self.records, self.vqgan = config, env, [], None
        self.out_dir = Path(config.out_dir)
        seq_len = config.images_per_seq * config.tokens_per_image
        # forward + backward (twice the forward) per token
        self.flops_per_token = 3 * estimate_flops(model.args, seq_len) / seq_len
        self.peak = distributed.peak_flops(distributed.device_name(env))
        self.tokens_per_step = config.batch_size * seq_len
        if env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            accum = config.batch_size // (config.micro_batch_size * env.num_devices)
            print(f"model: {model.num_params() / 1e6:.1f}M parameters ({model.args}); device: "
                  f"{env.num_devices} x {distributed.device_name(env)}, {env.parallel}, "
                  f"{env.dtype}; batch: {config.batch_size} x {seq_len} tokens = {accum} "
                  f"accumulation x {config.micro_batch_size} x {env.num_devices} devices; steps "
                  f"{step} -> {last} of {config.max_steps}")
        self.restart_clock()

    def restart_clock(self):
        self.loss_sum, self.steps, self.t0 = 0.0, 0, time.time()

    def add(self, loss):
        self.loss_sum, self.steps = self.loss_sum + loss, self.steps + 1

    def measure(self, step, lr):
        """The record of a log step: the loss averaged over the steps since the last one and over
        processes (this waits for the device), speed and MFU."""
        dt = (time.time() - self.t0) / self.steps
        record = dict(step=step, loss=distributed.mean_over_ranks(self.loss_sum / self.steps,
                                                                  self.env),
                      lr=lr, tokens_per_s=self.tokens_per_step / dt, ms_per_step=dt * 1e3)
        record["mfu"] = (self.flops_per_token * record["tokens_per_s"]
                         / (self.peak * self.env.num_devices) if self.peak else None)
        return record

    def write(self, record):
        """The progress line (and the in-context accuracy, when probed) and metrics.jsonl; the clock
        restarts, so evaluating and saving do not count as training time."""
        self.records.append(record)
        if self.env.is_main:
            mfu = f"{100 * record['mfu']:.1f}%" if record["mfu"] else "n/a"
            val = f" | val {record['val_loss']:.4f}" if "val_loss" in record else ""
            print(f"step {record['step']}/{self.config.max_steps} | loss {record['loss']:.4f}{val} "
                  f"| lr {record['lr']:.2e} | {record['tokens_per_s'] / 1e3:.1f}k tok/s | mfu "
                  f"{mfu} | {record['ms_per_step']:.0f} ms/step")
            for name, accuracy in record.get("in_context", {}).items():
                print(f"  in-context, {name}: answer tokens right (greedy) after "
                      + ", ".join(f"{k} pairs {v:.0f}%" for k, v in accuracy.items()))
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        self.restart_clock()

    def sample_grid(self, model_copy, eval_stream, step):
        """At an evaluation, on the main process: samples_STEP.png (num_samples rows, none if 0);
        the VQ-GAN that draws it is loaded the first time. The other processes wait for it."""
        if self.env.is_main and self.config.num_samples:
            if self.config.vqgan and self.vqgan is None:
                device = model_copy.output.weight.device
                self.vqgan = load_pretrained(self.config.vqgan, device=device)
            save_sample_grid(model_copy, eval_stream(0, self.config.num_samples), self.config,
                             self.out_dir / f"samples_{step:06d}.png", self.vqgan)
        distributed.barrier(self.env)


def check_finite(record, out_dir, saved_step):
    """Stop, before a diverged model is saved, with one line saying what --resume has left."""
    if not all(math.isfinite(record[k]) for k in ("loss", "val_loss") if k in record):
        raise TrainingError(f"the loss became {record['loss']} (validation "
                            f"{record.get('val_loss')}) by step {record['step']}: training "
                            f"diverged and stops here; {last_good(out_dir, saved_step)}. Lower "
                            "--lr or --grad_clip, or lengthen --warmup_steps, then --resume")


def whole_model(model, env):
    """A whole copy of the weights as a model on the main process (None on the others), on its GPU
    or on the host: what the probe and the sample grid run. Every process takes part."""
    state = distributed.full_model_state(model, env)
    device = env.device if env.device_type == "cuda" else torch.device("cpu")
    return model_from_state(model.args, state, device) if env.is_main else None


def save_sample_grid(model, tokens, config, path, vqgan=None):
    """The model completes the last image of a few validation sequences from everything before it
    plus its top quarter (there is no start token, so some of the image is given). One row per
    sequence: up to 3 images before the last, the true last image, the model's completion."""
    S = config.tokens_per_image
    device = model.output.weight.device
    prompt = torch.from_numpy(tokens[:, :tokens.shape[1] - S + S // 4]).to(device)
    generator = torch.Generator(device).manual_seed(config.seed)  # the same draw each time
    codebook = vqgan.config["num_embeddings"] if vqgan is not None else None
    out = generate(model, prompt, S - S // 4, temperature=1.0, top_k=100, codebook_size=codebook,
                   generator=generator, tokens_per_image=S).cpu()
    shown = torch.cat([torch.from_numpy(tokens[:, -min(config.images_per_seq, 4) * S:]),
                       out[:, -S:]], 1)
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
