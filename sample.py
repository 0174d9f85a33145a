"""
In-context visual generation (paper 2.1, 2.4): prompt the model with images, get images back.

An LVM prompt is images turned into VQ-GAN codes and concatenated (no start, separator or end
tokens); the model continues the sequence one code at a time (top-k sampling with temperature), and
the new codes are decoded back to pixels.

    # an in-context task: one or more "A, B" example pairs, then the query A; generates its B
    python sample.py --model out/ckpt.pt --vqgan out/vqgan_toy --prompt a1.png b1.png --query q.png
    # video continuation: 5 frames (files, a folder of frames, or a video file) -> 11 new frames + a
    # GIF
    python sample.py --model out/ckpt.pt --vqgan out/vqgan_toy --frames clip.mp4 --num_new 11
    # unconditional images from a stage-1 (single-image) model
    python sample.py --model out/ckpt.pt --vqgan out/vqgan_toy --unconditional --num_samples 16
    # LVM's released 7B (a Hugging Face LLaMA directory) and tokenizer, with the compiled step
    python sample.py --model LVM_ckpts/7b --vqgan vqvae_ckpts --prompt a.png b.png --query q.png \\
        --compile

Read top to bottom: next_token_probabilities and sample_next (choosing a token) -> prefill and
decode_one_token -> generate (the loop) -> sample_images (images in, images out) -> the command
line. --compile swaps in a compiled decode step with the same tokens (infra/fast_decode.py).
"""
import argparse
import contextlib
import math
import sys
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from infra import fast_decode
from infra.checkpoint import load_model
from infra.images import load_image, read_frames, save_gif, save_grid, to_uint8
from vqgan import codes_per_image, images_to_tokens, tokens_to_images
from infra.vqgan_checkpoint import load_pretrained


def next_token_probabilities(logits, temperature=1.0, top_k=100, codebook_size=None):
    """logits [B, V] -> (probabilities [B, K], their token ids [B, K], or None when all are kept):
    softmax(logits / T) over the top_k largest (all when top_k is 0 or None), among the ids below
    codebook_size (the image codes, e.g. 8192 of LVM's 8292-token vocabulary)."""
    if codebook_size is not None:
        logits = logits[:, :codebook_size]  # the same as -inf logits for the unused slots
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature  # p = softmax(z / T)
    ids = None
    if top_k and top_k < logits.shape[-1]:  # keep the K most probable, renormalise over them
        logits, ids = torch.topk(logits, top_k, dim=-1)
    return torch.softmax(logits, dim=-1), ids


def sample_next(logits, temperature=1.0, top_k=100, codebook_size=None, generator=None):
    """logits [B, V] -> next token ids [B]: drawn from next_token_probabilities, or the argmax when
    T <= 1e-5 (greedy)."""
    if temperature <= 1e-5:
        return logits[:, :codebook_size].argmax(-1)
    probs, ids = next_token_probabilities(logits, temperature, top_k, codebook_size)
    # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race); unlike torch.multinomial it
    # never waits for the GPU, so decoding can run ahead of the device
    choice = (probs / torch.empty_like(probs).exponential_(1, generator=generator)).argmax(-1)
    return choice if ids is None else ids.gather(-1, choice[:, None]).squeeze(-1)


def window_start(length, max_len, tokens_per_image):
    """Index of the first token the model sees when predicting token `length`: whole images are
    dropped from the front until at most max_len tokens remain, so positions never leave the range
    the model was trained on."""
    if length <= max_len:
        return 0
    if not tokens_per_image:
        raise ValueError(f"the sequence ({length} tokens) outgrows the model's context "
                         f"({max_len}); pass tokens_per_image so generation can slide the "
                         "window image by image")
    return math.ceil((length - max_len) / tokens_per_image) * tokens_per_image


def prefill(model, tokens):
    """Run a whole context [B, T] at positions 0..T-1, filling the cache; logits of its last
    position [B, V]."""
    return model(tokens, input_pos=torch.arange(tokens.shape[1], device=tokens.device))[0][:, -1]


def decode_one_token(model, token, input_pos, temperature=1.0, top_k=100, codebook_size=None,
                     generator=None):
    """One token [B, 1] at position input_pos [1], attending to the cache, and the token that
    follows it [B], chosen by sample_next."""
    logits = model(token, input_pos=input_pos)[0][:, -1]
    return sample_next(logits, temperature, top_k, codebook_size, generator)


@contextlib.contextmanager
def cached_decode_step(model, batch_size, length, compile=False):
    """The function that decodes one token (decode_one_token), with a key/value cache for one
    generate call: allocated once (never per token) and freed after it. compile: fast_decode's
    compiled step, with its own cache, instead (the same tokens)."""
    if compile:
        with fast_decode.compiled_step(model, batch_size, length,
                                       next_token_probabilities) as step:
            yield step
        return
    model.setup_cache(batch_size, min(length, model.args.max_seq_len))
    try:
        yield decode_one_token
    finally:
        model.clear_cache()


@torch.inference_mode()
def generate(model, prompt_tokens, max_new_tokens, temperature=1.0, top_k=100, codebook_size=None,
             generator=None, tokens_per_image=None, progress=False, compile=False):
    """Continue prompt_tokens [B, T] (int64) by max_new_tokens tokens: returns
    [B, T + max_new_tokens].

    Never stops early (image codes have no end token). temperature <= 1e-5 is greedy; codebook_size
    restricts sampling to image codes; generator (on the model's device) makes sampling
    reproducible. When the sequence outgrows model.args.max_seq_len, the oldest whole images
    (tokens_per_image each) are dropped and the kept context is run again from position 0. compile:
    the same tokens from a compiled decode step (infra/fast_decode.py); the first call compiles
    it."""
    B, T = prompt_tokens.shape
    max_len, total = model.args.max_seq_len, T + max_new_tokens
    if T == 0:
        raise ValueError("generate needs at least one prompt token (there is no start token); "
                         "sample_images(model, vqgan, None, ...) starts unconditional images "
                         "from a random first code")
    if tokens_per_image and tokens_per_image > max_len:
        raise ValueError(f"an image of {tokens_per_image} tokens does not fit the model's context "
                         f"of {max_len}")
    seq = torch.empty(B, total, dtype=torch.long, device=model.output.weight.device)
    seq[:, :T] = prompt_tokens
    sampling = dict(temperature=temperature, top_k=top_k, codebook_size=codebook_size,
                    generator=generator)
    start, input_pos = None, torch.zeros(1, dtype=torch.long, device=seq.device)
    with cached_decode_step(model, B, total, compile) as step:
        for cur in tqdm(range(T, total), desc="generating", unit="tok", disable=not progress,
                        leave=False):
            window = window_start(cur, max_len, tokens_per_image)
            if window != start:  # the prompt, or the full window slid by an image: fill the cache
                start = window
                token = sample_next(prefill(model, seq[:, start:cur]), **sampling)
            else:  # the last token, at its position in the window, attending to the cache
                input_pos.fill_(cur - 1 - start)
                token = step(model, token[:, None], input_pos, **sampling)
            seq[:, cur] = token
    return seq


def sample_images(model, vqgan, prompt_images, num_new_images, num_samples=1, temperature=1.0,
                  top_k=100, generator=None, compile=False, progress=False):
    """Generate num_new_images images after each prompt: prompt_images [B, n, 3, H, W] (uint8 or
    float in [0, 1], e.g. A1, B1, ..., query; or video frames), each sampled num_samples times; None
    gives num_samples unconditional images (the model has no start token, so the first code is drawn
    uniformly from the codebook). Returns float [B * num_samples, num_new_images, 3, H, W] in [0, 1]
    on the CPU, a prompt's samples adjacent."""
    device = model.output.weight.device
    S, K = codes_per_image(vqgan), vqgan.config["num_embeddings"]
    if model.args.vocab_size < K:
        raise ValueError(f"the model's vocabulary ({model.args.vocab_size}) is smaller than the "
                         f"VQ-GAN codebook ({K}): this model was not trained on this tokenizer")
    if prompt_images is None:
        gen_device = generator.device if generator is not None else device
        prompt = torch.randint(K, (num_samples, 1), generator=generator, device=gen_device)
        prompt = prompt.to(device)
        new = num_new_images * S - 1
    else:
        B, n, _, H, W = prompt_images.shape
        R = vqgan.config["resolution"]
        if (H, W) != (R, R):
            raise ValueError(f"prompt images are {H}x{W} but the VQ-GAN takes {R}x{R}; read them "
                             "with images.load_image")
        prompt = images_to_tokens(vqgan, prompt_images.flatten(0, 1)).view(B, n * S).to(device)
        prompt = prompt.repeat_interleave(num_samples, dim=0)
        new = num_new_images * S
    seq = generate(model, prompt, new, temperature, top_k, codebook_size=K, generator=generator,
                   tokens_per_image=S, progress=progress, compile=compile)
    return tokens_to_images(vqgan, seq[:, -num_new_images * S:], S).cpu()


# -----------------------------------------------------------------------------
# command line


WHERE_MODELS_COME_FROM = (
    "a trained model (finetune.py's ckpt.pt or out_dir, or a Hugging Face LLaMA directory such as "
    "LVM's released 7B) and its VQ-GAN directory; `python run_toy.py` trains both on the toy world "
    "(then --model out/toy/stage2 --vqgan out/toy/vqgan)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generate images from an LVM-Lite model: analogies, "
                                "video continuation or unconditional images. Writes a PNG grid "
                                "and the generated images.")
    p.add_argument("--model",
                   help="ckpt.pt from pretrain.py (or its folder), or a Hugging Face "
                   "LLaMA directory (e.g. LVM's 7B)")
    p.add_argument("--vqgan",
                   help="VQ-GAN checkpoint directory or hub id (infra/vqgan_checkpoint.py)")
    mode = p.add_argument_group("what to generate (choose one)")
    mode.add_argument("--prompt", nargs="+", default=[], metavar="IMG",
                      help="example pairs A1 B1 [A2 B2 ...] stating the task (with --query)")
    mode.add_argument("--query", metavar="IMG", help="the image whose counterpart is generated")
    mode.add_argument("--frames", nargs="+", metavar="SRC",
                      help="video frames to continue: image files, a folder of frames "
                           "or a video file")
    mode.add_argument("--unconditional", action="store_true",
                      help="images from nothing (stage-1 models)")
    p.add_argument("--num_frames", type=int, default=5,
                   help="prompt frames taken from a folder or video file")
    p.add_argument("--frame_stride", type=int, default=1,
                   help="use every n-th frame of a folder or video file")
    p.add_argument("--num_new", type=int, default=None,
                   help="images to generate (default: 11 for video, else 1)")
    p.add_argument("--num_samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--batch_size", type=int, default=16, help="samples generated at once")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy")
    p.add_argument("--top_k", type=int, default=100,
                   help="sample among the k most likely codes; 0 = all")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="model weights (default: bfloat16 on a GPU; on a CPU the checkpoint's own "
                        "dtype, bfloat16 where float32 would not fit in memory)")
    p.add_argument("--quantize", metavar="int8|int4",
                   help="the blocks' linear weights in 8 (or 4) bits, activations in --dtype "
                        "(infra/quantize.py): about half (a quarter) of bfloat16's memory, "
                        "faster decoding; int4 on a CPU only")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (infra/fast_decode.py): the same tokens, several "
                        "times faster; the first call compiles for seconds to a minute")
    p.add_argument("--fps", type=float, default=4, help="frames per second of the video GIF")
    p.add_argument("--out_dir", default="out/samples", help="where grid.png and the images go")
    args = p.parse_args(argv)
    if not (args.model and args.vqgan):
        p.error(f"pass --model and --vqgan: {WHERE_MODELS_COME_FROM}")
    modes = sum([args.query is not None, args.frames is not None, args.unconditional])
    if modes != 1:
        p.error("choose exactly one of --query (with optional --prompt pairs), --frames or "
                "--unconditional")
    if args.prompt and args.query is None:
        p.error("--prompt pairs need a --query image to answer")
    if len(args.prompt) % 2:
        p.error(f"--prompt takes pairs (A1 B1 A2 B2 ...), got {len(args.prompt)} images")
    if args.num_new is None:
        args.num_new = 11 if args.frames else 1
    if args.num_new < 1 or args.num_samples < 1 or args.batch_size < 1 or args.top_k < 0:
        p.error("--num_new, --num_samples and --batch_size must be >= 1 and --top_k >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        device = torch.device(args.device)
        tokenizer = load_pretrained(args.vqgan, device=device)
        # default: the checkpoint's dtype (LVM's bfloat16 stays bfloat16), bfloat16 on a GPU
        model = load_model(args.model, device, getattr(torch, args.dtype) if args.dtype else "auto",
                           quantize=args.quantize)
        R = tokenizer.config["resolution"]
        if args.unconditional:
            prompt, cut = None, 0
        elif args.frames:
            prompt = read_frames(args.frames, R, args.num_frames, args.frame_stride)
            cut = len(prompt)
        else:
            prompt = torch.stack([load_image(f, R) for f in args.prompt + [args.query]])
            cut = len(args.prompt)
        print(f"model: {model.num_params() / 1e6:.1f}M parameters, context "
              f"{model.args.max_seq_len} tokens; {0 if prompt is None else len(prompt)} prompt "
              f"images of {codes_per_image(tokenizer)} tokens, {args.num_new} new per sample")
        torch.manual_seed(args.seed)
        generator = torch.Generator(device).manual_seed(args.seed)
        samples = []
        for i in range(0, args.num_samples, args.batch_size):
            n = min(args.batch_size, args.num_samples - i)
            samples.append(sample_images(model, tokenizer, None if prompt is None else prompt[None],
                                         args.num_new, n, args.temperature, args.top_k, generator,
                                         args.compile, progress=True))
        samples = torch.cat(samples)
    except (FileNotFoundError, ValueError, MemoryError) as e:
        sys.exit(f"sample.py: error: {e}")

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompt_cells = [] if prompt is None else list(prompt[:cut]) + [None] + list(prompt[cut:])
    save_grid([prompt_cells + list(s) for s in samples], out / "grid.png")
    for i, s in enumerate(samples):
        for j, image in enumerate(s):
            Image.fromarray(to_uint8(image)).save(out / f"sample{i:02d}_{j:02d}.png")
        if args.frames:
            save_gif(torch.cat([prompt.float() / 255, s]), out / f"sample{i:02d}.gif", fps=args.fps)
    kinds = "images and GIFs" if args.frames else "images"
    print(f"wrote {out / 'grid.png'} and {len(samples)} samples' {kinds} to {out}/")


if __name__ == "__main__":
    main()
