"""
In-context visual generation: prompt the model with images, get images back.

An LVM prompt is just images turned into VQ-GAN codes and concatenated (no start, separator or end
tokens); the model continues the sequence one code at a time (top-k sampling with temperature, the
paper's section 2.3), and the new codes are decoded back to pixels.

    # analogy / in-context task: one or more "A, B" example pairs, then the query A; generates its B
    python sample.py --model out/ckpt.pt --vqgan out/vqgan_toy --prompt a1.png b1.png --query q.png
    # video continuation: 5 frames (files, a folder of frames, or a video file) -> 11 new frames,
    # also a GIF
    python sample.py --model out/ckpt.pt --vqgan out/vqgan_toy --frames clip.mp4 --num_new 11
    # unconditional images from a stage-1 (single-image) model
    python sample.py --model out/ckpt.pt --vqgan out/vqgan_toy --unconditional --num_samples 16
    # LVM's released 7B (a Hugging Face LLaMA directory) and tokenizer
    python sample.py --model LVM_ckpts/7b --vqgan vqvae_ckpts --prompt a.png b.png --query q.png \\
        --compile

Other code samples through the same functions: `generate` (tokens -> tokens, KV-cached),
`sample_images` (images -> images), `tokens_to_images` / `images_to_tokens`, `save_grid`,
`load_model`.
"""
import argparse
import contextlib
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from model import ModelArgs, Transformer, load_hf

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif"}

# -----------------------------------------------------------------------------
# choosing the next token


def sample_next(logits, temperature=1.0, top_k=100, codebook_size=None, generator=None, noise=None):
    """logits [B, V] -> next token ids [B]: softmax(logits / T) over the top_k largest, or argmax
    when T <= 1e-5. codebook_size: only ids below it (image codes) can come out, e.g. 8192 of LVM's
    8292-token vocabulary. noise: the Exp(1) draws to use, [B, num_candidates(...)] float32; drawn
    from generator when None (a compiled step takes them as an input instead)."""
    if codebook_size is not None:
        # the same as -inf logits for the unused slots, without the work
        logits = logits[:, :codebook_size]
    if temperature <= 1e-5:
        return logits.argmax(-1)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature  # p = softmax(z / T)
    if top_k and top_k < logits.shape[-1]:
        # keep the K most probable, renormalise over them
        logits, ids = torch.topk(logits, top_k, dim=-1)
    else:
        ids = None
    probs = torch.softmax(logits, dim=-1)
    # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race); unlike torch.multinomial it
    # never synchronises with the GPU, so decoding can run ahead of the device
    if noise is None:
        noise = torch.empty_like(probs).exponential_(1, generator=generator)
    choice = (probs / noise).argmax(-1)
    return choice if ids is None else ids.gather(-1, choice[:, None]).squeeze(-1)


def num_candidates(vocab_size, top_k=100, codebook_size=None):
    """How many tokens sample_next draws among: top_k, or every allowed id."""
    allowed = min(vocab_size, codebook_size or vocab_size)
    return min(top_k, allowed) if top_k else allowed


# -----------------------------------------------------------------------------
# generation with the static key/value cache (gpt-fast style): one prefill pass, then one token per
# step


def window_start(length, max_len, tokens_per_image):
    """Index of the first token the model sees when predicting token `length`: whole images are
    dropped from the front until at most max_len tokens remain, so positions never leave the range
    the model was trained on."""
    if length <= max_len:
        return 0
    if not tokens_per_image:
        raise ValueError(f"the sequence ({length} tokens) outgrows the model's context "
                         f"({max_len}); pass tokens_per_image so generation can slide the window "
                         "image by image")
    return math.ceil((length - max_len) / tokens_per_image) * tokens_per_image


def prefill(model, tokens):
    """Run a whole context [B, T] at positions 0..T-1, filling the cache; logits of its last
    position [B, V]."""
    input_pos = torch.arange(tokens.shape[1], device=tokens.device)
    return model(tokens, input_pos=input_pos, kv_len=tokens.shape[1])[0][:, -1]


def decode_one_token(model, token, input_pos, kv_len=None, **sampling):
    """One token [B, 1] at position input_pos [1], attending to the first kv_len cache slots (None:
    all of them), and the token that follows it [B], chosen by sample_next(logits, **sampling)."""
    return sample_next(model(token, input_pos=input_pos, kv_len=kv_len)[0][:, -1], **sampling)


_compiled_decode = None


def _decode_fn(device, compile):
    """The decode step, model and sampling, compiled once per process when asked (CUDA graphs on GPU
    remove the per-kernel launch cost that dominates small-batch decoding). Shapes stay fixed:
    [B, 1] token, [1] position, static cache, [B, candidates] noise."""
    global _compiled_decode
    if not compile:
        return decode_one_token
    if _compiled_decode is None:
        if device.type == "cuda":  # the whole step recorded as one CUDA graph, replayed per token
            how = dict(mode="reduce-overhead")
        else:  # the step's kernels called from generated C++ rather than a Python wrapper
            how = dict(options={"cpp_wrapper": True})
        _compiled_decode = torch.compile(decode_one_token, fullgraph=True, dynamic=False, **how)
    return _compiled_decode


def _unwrap(model):
    """The Transformer inside torch.compile / DistributedDataParallel wrappers
    (the training loop may pass one)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def _ensure_cache(model, batch_size, cache_len):
    """Allocate the static cache unless one of this shape is there (a compiled step keeps its own);
    True if new."""
    kv = model.layers[0].attention.kv_cache
    if (kv is not None and kv.k.shape[0] == batch_size and kv.k.shape[2] == cache_len
            and kv.k.dtype == model.output.weight.dtype):
        return False
    model.setup_cache(batch_size, cache_len)
    return True


@torch.inference_mode()
def generate(model, prompt_tokens, max_new_tokens, temperature=1.0, top_k=100, codebook_size=None,
             generator=None, compile=False, tokens_per_image=None, progress=False):
    """Continue prompt_tokens [B, T] (int64) by max_new_tokens tokens; returns
    [B, T + max_new_tokens].

    Never stops early (image codes have no end token). temperature <= 1e-5 is greedy. codebook_size
    restricts sampling to image codes. generator (on the model's device) makes sampling
    reproducible. compile: compile the decode step (CUDA graphs on GPU; the first call pays the
    compile time, and the cache is kept for the next call; the same tokens as eager for the same
    generator, up to float rounding). When the sequence outgrows
    model.args.max_seq_len, the oldest whole images (tokens_per_image each) are dropped and the kept
    context is re-run from position 0."""
    model = _unwrap(model)
    B, T = prompt_tokens.shape
    if T == 0:
        raise ValueError("generate needs at least one prompt token (there is no start token); "
                         "sample_images(model, vqgan, None, ...) draws a random first code for "
                         "unconditional images")
    max_len = model.args.max_seq_len
    if tokens_per_image and tokens_per_image > max_len:
        raise ValueError(f"an image of {tokens_per_image} tokens does not fit the model's context "
                         f"of {max_len}")
    device = model.output.weight.device
    total = T + max_new_tokens
    seq = torch.empty(B, total, dtype=torch.long, device=device)
    seq[:, :T] = prompt_tokens
    if max_new_tokens <= 0:
        return seq
    cache_len = min(total, max_len)
    # round up so that nearby lengths reuse one compiled graph
    # (the causal mask hides the extra slots)
    if compile:
        cache_len = min(max_len, math.ceil(total / 256) * 256)
    allocated = _ensure_cache(model, B, cache_len)  # once per call, never per token
    step = _decode_fn(device, compile)
    input_pos = torch.zeros(1, dtype=torch.long, device=device)
    # one token's Exp(1) draws, refilled in place from `generator` before each token: the compiled
    # step samples inside its graph from a fixed input (greedy decoding needs none)
    noise = None
    if temperature > 1e-5:
        noise = torch.empty(B, num_candidates(model.args.vocab_size, top_k, codebook_size),
                            device=device)
    sampling = dict(temperature=temperature, top_k=top_k, codebook_size=codebook_size, noise=noise)

    start, guarded = None, True
    with contextlib.ExitStack() as unguarded:
        for cur in tqdm(range(T, total), desc="generating", unit="tok", disable=not progress,
                        leave=False):
            if noise is not None:
                noise.exponential_(1, generator=generator)
            new_start = window_start(cur, max_len, tokens_per_image)
            if new_start != start:  # the prompt, or the full window slid by an image: (re)fill
                start = new_start
                token = sample_next(prefill(model, seq[:, start:cur]), **sampling)
            else:
                input_pos.fill_(cur - 1 - start)
                # eager steps read only the filled cache slots; a compiled one keeps its shapes (and
                # its CUDA graph's output is overwritten by the next replay: hence the copy)
                token = step(model, token[:, None], input_pos, None if compile else cur - start,
                             **sampling)
                if compile:
                    token = token.clone()
                    if guarded:
                        # the first compiled step checked its guards (model, cache, shapes); the
                        # later ones make the very same call, so they skip that per-token check
                        unguarded.enter_context(
                            torch.compiler.set_stance(skip_guard_eval_unsafe=True))
                        guarded = False
            seq[:, cur] = token
    # a compiled step keeps its cache (and CUDA graphs) for the next call
    if allocated and not compile:
        model.clear_cache()
    return seq


# -----------------------------------------------------------------------------
# images <-> tokens


def codes_per_image(vqgan):
    """Tokens of one image: (resolution / downsample factor)^2, e.g. 256 for the paper's f16 VQ-GAN
    at 256x256."""
    side = vqgan.config["resolution"] // vqgan.downsample_factor
    return side * side


def images_to_tokens(vqgan, images):
    """Images [N, 3, H, W], uint8 or float in [0, 1] -> VQ-GAN codes int64 [N, tokens_per_image]."""
    device = next(vqgan.parameters()).device
    pixels = images.to(device)
    pixels = pixels.float() / 255 if pixels.dtype == torch.uint8 else pixels.float()
    return vqgan.encode(pixels)


def tokens_to_images(vqgan, tokens, tokens_per_image=None):
    """Codes [B, n * tokens_per_image] -> float images [B, n, 3, H, W] in [0, 1]."""
    S = tokens_per_image or codes_per_image(vqgan)
    B, L = tokens.shape
    if L % S:
        raise ValueError(f"{L} tokens are not a whole number of {S}-token images")
    device = next(vqgan.parameters()).device
    images = vqgan.decode(tokens.reshape(B * L // S, S).to(device)).clamp(0, 1)
    return images.view(B, L // S, *images.shape[1:])


def sample_images(model, vqgan, prompt_images, num_new_images, num_samples=1,
                  temperature=1.0, top_k=100, generator=None, compile=False, progress=False):
    """Generate num_new_images images after each prompt: prompt_images [B, n, 3, H, W]
    (uint8 or float in [0, 1], e.g. A1, B1, ..., query; or video frames), each sampled num_samples
    times; None gives num_samples unconditional images (the model has no start token, so the first
    code is drawn uniformly from the codebook). Returns float
    [B * num_samples, num_new_images, 3, H, W] in [0, 1] on the CPU, a prompt's samples adjacent."""
    core = _unwrap(model)
    device = core.output.weight.device
    S, K = codes_per_image(vqgan), vqgan.config["num_embeddings"]
    if core.args.vocab_size < K:
        raise ValueError(f"the model's vocabulary ({core.args.vocab_size}) is smaller than "
                         f"the VQ-GAN codebook ({K}): this model was not trained on this tokenizer")
    if prompt_images is None:
        gen_device = generator.device if generator is not None else device
        prompt = torch.randint(K, (num_samples, 1), generator=generator,
                               device=gen_device).to(device)
        new = num_new_images * S - 1
    else:
        B, n, _, H, W = prompt_images.shape
        R = vqgan.config["resolution"]
        if (H, W) != (R, R):
            raise ValueError(f"prompt images are {H}x{W} but the VQ-GAN takes {R}x{R}; load them "
                             "with load_image")
        prompt = images_to_tokens(vqgan, prompt_images.flatten(0, 1)).view(B, n * S).to(device)
        prompt = prompt.repeat_interleave(num_samples, dim=0)
        new = num_new_images * S
    seq = generate(model, prompt, new, temperature, top_k, codebook_size=K, generator=generator,
                   compile=compile, tokens_per_image=S, progress=progress)
    return tokens_to_images(vqgan, seq[:, -num_new_images * S:], S).cpu()


# -----------------------------------------------------------------------------
# files: checkpoints, images, videos, grids


def load_model(path, device="cpu", dtype=None):
    """An eval-mode Transformer from a training checkpoint (a ckpt.pt with 'model' and 'model_args',
    or a directory holding one) or a Hugging Face LLaMA directory (config.json + safetensors, e.g.
    LVM's 7B)."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").exists():
        return load_hf(path, dtype=dtype, device=device)
    if path.is_dir() and (path / "ckpt.pt").exists():
        path = path / "ckpt.pt"
    if not path.is_file():
        raise FileNotFoundError(f"model {str(path)!r} not found: pass a ckpt.pt written by "
                                "pretrain.py or a Hugging Face LLaMA directory with config.json")
    # a checkpoint must never run code
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise ValueError(f"{path} is not a training checkpoint: it needs the keys 'model' and "
                         "'model_args'")
    state = {}
    for name, tensor in ckpt["model"].items():
        # torch.compile / DDP wrappers prefix the names
        while name.startswith(("_orig_mod.", "module.")):
            name = name.split(".", 1)[1]
        state[name] = tensor.to(device=device, dtype=dtype or tensor.dtype)
    with torch.device("meta"):  # no memory for random weights we would overwrite
        model = Transformer(ModelArgs(**ckpt["model_args"]))
    missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match model_args ({len(missing)} missing, e.g. "
                         f"{sorted(missing)[:2]}; {len(unexpected)} unexpected, e.g. "
                         f"{sorted(unexpected)[:2]})")
    model.load_state_dict(state, strict=True, assign=True)
    model.init_rope(device)
    return model.eval()


def _square(im, resolution):
    """PIL image -> uint8 [3, R, R]: RGB, shorter side resized to R, centre-cropped."""
    im = im.convert("RGB")
    scale = resolution / min(im.size)
    w, h = max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))
    if (w, h) != im.size:
        im = im.resize((w, h), Image.BICUBIC)
    left, top = (w - resolution) // 2, (h - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()


def load_image(path, resolution):
    """An image file as uint8 [3, R, R] (RGB, shorter side resized to R, centre-cropped)."""
    try:
        return _square(Image.open(path), resolution)
    except (FileNotFoundError, OSError) as e:
        raise FileNotFoundError(f"cannot read image {str(path)!r} ({e}); "
                                "pass PNG/JPEG files") from None


def load_frames(sources, resolution, num_frames=None, stride=1):
    """Frames as uint8 [N, 3, R, R] from image files, one folder of images (sorted by name) or one
    video file; every stride-th frame, at most num_frames of them."""
    sources = [Path(s) for s in sources]
    if len(sources) == 1 and sources[0].suffix.lower() in VIDEO_EXTS and sources[0].is_file():
        import av
        frames, needed = [], None if num_frames is None else (num_frames - 1) * stride + 1
        try:
            with av.open(str(sources[0])) as container:
                for frame in container.decode(video=0):
                    frames.append(_square(frame.to_image(), resolution))
                    if needed is not None and len(frames) >= needed:
                        break
        except av.error.FFmpegError as e:
            raise FileNotFoundError(f"cannot read video {str(sources[0])!r} ({e})") from None
    else:
        if len(sources) == 1 and sources[0].is_dir():
            sources = sorted(p for p in sources[0].iterdir() if p.suffix.lower() in IMAGE_EXTS)
        frames = [load_image(p, resolution) for p in sources]
    frames = frames[::stride][:num_frames]
    if not frames:
        raise FileNotFoundError("no frames found in "
                                f"{' '.join(map(str, sources)) or 'an empty folder'}")
    return torch.stack(frames)


def _to_uint8(image):
    """[3, H, W] uint8 or float in [0, 1] -> numpy uint8 [H, W, 3]."""
    if image.is_floating_point():
        image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return image.permute(1, 2, 0).cpu().numpy()


def save_grid(rows, path, gap=2, min_size=128):
    """Write a PNG grid: rows is a list of rows, each a list of images [3, H, W]
    (uint8, or float in [0, 1]; all of one size) or None for a blank cell. Small images are scaled
    up (nearest) to at least min_size pixels."""
    cells = [im for row in rows for im in row if im is not None]
    if not cells:
        raise ValueError("save_grid got no images")
    H, W = cells[0].shape[-2:]
    ncol = max(len(row) for row in rows)
    canvas = np.full((len(rows) * (H + gap) - gap, ncol * (W + gap) - gap, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            if image is not None:
                canvas[r * (H + gap):r * (H + gap) + H,
                       c * (W + gap):c * (W + gap) + W] = _to_uint8(image)
    grid = Image.fromarray(canvas)
    scale = max(1, math.ceil(min_size / H))
    grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).save(path)


def save_gif(frames, path, fps=4, min_size=128):
    """Write frames [N, 3, H, W] (uint8 or float in [0, 1]) as a looping GIF, small frames scaled
    up."""
    scale = max(1, math.ceil(min_size / frames.shape[-2]))
    images = [Image.fromarray(_to_uint8(f)) for f in frames]
    images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
    images[0].save(path, save_all=True, append_images=images[1:],
                   duration=round(1000 / fps), loop=0)


# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generate images from an LVM-Lite model: analogies, "
                                "video continuation or unconditional images. Writes a PNG grid "
                                "and the generated images.")
    p.add_argument("--model", required=True,
                   help="ckpt.pt from pretrain.py (or its folder), or a Hugging Face "
                   "LLaMA directory (e.g. LVM's 7B)")
    p.add_argument("--vqgan", required=True,
                   help="VQ-GAN checkpoint directory or hub id (vqgan.load_pretrained)")
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
                   help="model weights (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step: CUDA graphs on GPU, C++ on CPU (2.5x eager for "
                        "the toy model here); the first call compiles for seconds to a minute")
    p.add_argument("--fps", type=float, default=4, help="frames per second of the video GIF")
    p.add_argument("--out_dir", default="out/samples", help="where grid.png and the images go")
    args = p.parse_args(argv)
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
        dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        import vqgan as vq
        tokenizer = vq.load_pretrained(args.vqgan, device=device)
        model = load_model(args.model, device, dtype)
        R = tokenizer.config["resolution"]
        if args.unconditional:
            prompt, cut = None, 0
        elif args.frames:
            prompt = load_frames(args.frames, R, args.num_frames, args.frame_stride)
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
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"sample.py: error: {e}")

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompt_cells = [] if prompt is None else list(prompt[:cut]) + [None] + list(prompt[cut:])
    save_grid([prompt_cells + list(s) for s in samples], out / "grid.png")
    for i, s in enumerate(samples):
        for j, image in enumerate(s):
            Image.fromarray(_to_uint8(image)).save(out / f"sample{i:02d}_{j:02d}.png")
        if args.frames:
            save_gif(torch.cat([prompt.float() / 255, s]), out / f"sample{i:02d}.gif", fps=args.fps)
    kinds = "images and GIFs" if args.frames else "images"
    print(f"wrote {out / 'grid.png'} and {len(samples)} samples' {kinds} to {out}/")


if __name__ == "__main__":
    main()
