"""
Checkpoints: the one way from a file to a model, the two ways back, and a training run's saves.

    # a ckpt.pt of our training, a sharded one (sharded_checkpoint.py), or the out_dir of either
    model = load_model("out/finetune")
    # a Hugging Face LlamaForCausalLM directory: LVM's 7B, DeLVM's 300M / 1B, or our own export
    model = load_model("LVM_ckpts/7b")
    save_checkpoint("out/ckpt.pt", state)  # atomic: a crash mid-write leaves the previous file
    save_hf(model, "out/hf")               # a directory transformers' from_pretrained reads

A training checkpoint (ckpt.pt) is a dict of tensors and plain values, loaded with weights_only (a
checkpoint must never run code): model (the state dict), model_args (ModelArgs as a dict), and for
resuming optimizer, step, data_position, config and rng (every rank's). Runs whose weights are
split over devices write sharded checkpoints instead, a folder of shards (sharded_checkpoint.py).
Loading errors are FileNotFoundError (nothing there) or ValueError (something there, but not a
checkpoint of this model), each one line; a training run's (resume, save) are TrainingError.
"""
import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from configs import MODEL_SIZES
from infra import distributed, quantize as quantization, sharded_checkpoint
from infra.sharded_checkpoint import write_file
from infra.settings import TrainingError
from model import ModelArgs, Transformer

# (Hugging Face name, our name); "{}" is the layer index. HF gate/up/down = our w1/w3/w2
HF_NAMES = [
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.layers.{}.self_attn.q_proj.weight", "layers.{}.attention.wq.weight"),
    ("model.layers.{}.self_attn.k_proj.weight", "layers.{}.attention.wk.weight"),
    ("model.layers.{}.self_attn.v_proj.weight", "layers.{}.attention.wv.weight"),
    ("model.layers.{}.self_attn.o_proj.weight", "layers.{}.attention.wo.weight"),
    ("model.layers.{}.mlp.gate_proj.weight", "layers.{}.feed_forward.w1.weight"),
    ("model.layers.{}.mlp.down_proj.weight", "layers.{}.feed_forward.w2.weight"),
    ("model.layers.{}.mlp.up_proj.weight", "layers.{}.feed_forward.w3.weight"),
    ("model.layers.{}.input_layernorm.weight", "layers.{}.attention_norm.weight"),
    ("model.layers.{}.post_attention_layernorm.weight", "layers.{}.ffn_norm.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "output.weight"),
]
# torch.compile and DDP prefix the names of the model they wrap
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def load_model(path, device="cpu", dtype=None, quantize=None):
    """An eval-mode Transformer from a training checkpoint (a ckpt.pt, a sharded checkpoint's
    folder, or the out_dir holding either) or a Hugging Face LLaMA directory (config.json +
    safetensors or pytorch_model.bin, one file or shards). dtype: cast the weights (default: as
    stored); "auto": bfloat16 on a GPU, on a CPU the stored dtype, or bfloat16 for a float32
    checkpoint too big for free memory (said in one line). quantize: "int8" or "int4", the blocks'
    linear weights quantized as they are read (infra/quantize.py), dtype then being the compute
    dtype. A Hugging Face directory is checked against free memory before it is read: a
    MemoryError of one line says what is needed and what helps."""
    path, device = Path(path), torch.device(device)
    quantization.check_mode(quantize, device)
    if path.is_dir() and (path / "config.json").exists():
        args, stored = _hf_args_and_dtype(path)
        if dtype == "auto":
            dtype = auto_dtype(args, stored, device, quantize)
        check_memory(args, dtype or stored, device, quantize)
        try:
            args, state = _read_hf(path, dtype, quantize)
        except (MemoryError, RuntimeError) as e:  # failed anyway (a limit that is not RAM)
            if not isinstance(e, MemoryError) and not re.search("alloc|mmap|memory", str(e)):
                raise
            raise MemoryError(f"out of memory while loading {path} ({str(e).splitlines()[0]}); "
                              f"{MEMORY_HELP}") from None
    else:
        if dtype == "auto":  # our checkpoints are float32: bfloat16 where it is fast
            dtype = torch.bfloat16 if device.type != "cpu" else None
        ckpt = load_checkpoint(path, keys=("model", "model_args"))
        args, state = ModelArgs(**ckpt["model_args"]), {}
        weights = (sharded_checkpoint.load_weights(ckpt["shards"], args) if "shards" in ckpt
                   else ckpt["model"])
        for name, tensor in weights.items():
            while name.startswith(WRAPPER_PREFIXES):
                name = name.split(".", 1)[1]
            state[name] = tensor
        if quantize and quantization.stored_mode(state):
            raise ValueError(f"{path} holds a model quantized to {quantization.stored_mode(state)} "
                             "already: load it without --quantize")
        if quantize:  # each float tensor dropped from the checkpoint's dict once quantized
            state = quantization.quantize_state(_popped(state), quantize, dtype)
    return model_from_state(args, state, device, dtype, source=path)


def _popped(state):
    while state:
        yield state.popitem()


def model_from_state(args, state, device="cpu", dtype=None, source="the state dict"):
    """An eval-mode Transformer holding these weights: built on the meta device (no memory for
    random weights that would be overwritten: it matters at 7B), then given the tensors
    themselves. A quantized state (infra/quantize.py) gets the quantized linear modules; dtype
    casts only floating tensors (never int8 weights)."""
    with torch.device("meta"):
        model = Transformer(args)
    if quantization.stored_mode(state):
        quantization.swap_linears(model, quantization.stored_mode(state), state)
    missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
    if missing or unexpected:
        raise ValueError(f"{source}: the weights do not match the model ({len(missing)} missing, "
                         f"e.g. {sorted(missing)[:2]}; {len(unexpected)} unexpected, e.g. "
                         f"{sorted(unexpected)[:2]})")
    state = {k: v.to(device=device, dtype=(dtype or v.dtype) if v.is_floating_point() else v.dtype)
             for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.init_rope(device)
    return model.eval()


def find_checkpoint(path):
    """The checkpoint `path` means: a ckpt.pt or a sharded checkpoint's folder itself; for a run's
    out_dir, the newer of its ckpt.pt and the folder its `latest` file names (both are there only
    when a run that changed kind stopped between writing the new one and removing the old)."""
    path = Path(path)
    if not path.is_dir() or sharded_checkpoint.is_sharded(path):
        return path
    found = [p for p in (path / "ckpt.pt", sharded_checkpoint.latest(path)) if p and p.exists()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else path / "ckpt.pt"


def load_checkpoint(path, keys=("model", "model_args", "optimizer", "step", "data_position")):
    """The dict of a training checkpoint (a path find_checkpoint takes), checked to hold `keys`
    (the defaults: what resuming a training run needs). A sharded checkpoint's tensors stay on
    disk: its dict holds "shards", the folder, in place of model and optimizer."""
    path = find_checkpoint(path)
    if sharded_checkpoint.is_sharded(path):
        ckpt = sharded_checkpoint.read_meta(path)
        keys = set(keys) - {"model", "optimizer"}
    elif not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: pass a ckpt.pt written by pretrain.py "
                                "or finetune.py (or its folder), or a Hugging Face LLaMA directory "
                                "(config.json + weights)")
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
        except Exception as e:
            raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                             f"{e})") from None
    missing = set(keys) - set(ckpt) if isinstance(ckpt, dict) else set(keys)
    if missing:
        raise ValueError(f"{path} is not a checkpoint of this project's training: it lacks "
                         f"{sorted(missing)}")
    return ckpt


# -----------------------------------------------------------------------------
# memory: what a model needs against what is free, checked before loading (a 7B model in float32
# needs 26 GB: on a 24 GB machine the kernel would kill the process without a word)

MEMORY_HELP = ("pass --dtype bfloat16 (half of float32) or --quantize int8 (a quarter), run on a "
               "GPU (--device cuda), or use a smaller model")


def free_memory(device):
    """Bytes free on the device: the GPU's free memory, or the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        return kb * 1024
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_needed(args, dtype, quantize=None):
    """Bytes of the weights in dtype (the blocks' linear weights in quantize's bytes, when given)
    plus the key/value cache of one full context, in dtype."""
    size = torch.empty(0, dtype=dtype).element_size()
    with torch.device("meta"):
        params = Transformer(args).num_params()
    head_dim = args.dim // args.n_heads
    cache = 2 * args.n_layers * args.max_seq_len * args.n_kv_heads * head_dim
    if not quantize:
        return (params + cache) * size
    kv_dim = args.n_kv_heads * head_dim  # the quantized weights: wq wo, wk wv, w1 w2 w3
    linear = args.n_layers * args.dim * (2 * args.dim + 2 * kv_dim + 3 * args.hidden_dim)
    return int((params - linear + cache) * size + linear * quantization.bytes_per_weight(quantize))


def auto_dtype(args, stored, device, quantize=None):
    """bfloat16 on a GPU; on a CPU the stored dtype, unless float32 would not fit in free memory."""
    if device.type != "cpu":
        return torch.bfloat16
    need = memory_needed(args, stored, quantize)
    if stored == torch.float32 and need > free_memory(device):
        print(f"note: the float32 weights need {need / 2**30:.1f} GB, more than the "
              f"{free_memory(device) / 2**30:.1f} GB free: loading them in bfloat16")
        return torch.bfloat16
    return stored


def check_memory(args, dtype, device, quantize=None):
    need, free = memory_needed(args, dtype, quantize), free_memory(device)
    if need > free:
        name = str(dtype).removeprefix("torch.") + (f" with {quantize} weights" if quantize else "")
        raise MemoryError(f"the model needs {need / 2**30:.1f} GB in {name} (weights and a full "
                          f"key/value cache) but {free / 2**30:.1f} GB is free on {device.type}: "
                          f"{MEMORY_HELP}")


def save_checkpoint(path, checkpoint):
    """Write to a temporary file, then rename over the old one: a crash while saving leaves the
    previous checkpoint intact (the rename is atomic). A failed write (a full disk) raises its
    OSError."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write_file(tmp, lambda f: torch.save(checkpoint, f))
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: give back the space the part took
        raise
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# a training run's checkpoints (train.py calls these by name): what it resumes from, what it saves


def resume_checkpoint(config):
    """The checkpoint this run continues from, or None (it starts at step 0): with --resume,
    out_dir's newest (a ckpt.pt's whole dict, or a sharded one's small values; its tensors are
    read by resume(), each process its part). Without it, a run whose processes torchrun restarted
    (TORCHELASTIC_RESTART_COUNT > 0) continues from the newest checkpoint it wrote itself before
    the restart: one with the same torchrun run id and the same settings; any other is left
    alone and training starts afresh, as a first attempt would."""
    if config.resume:
        try:
            return load_checkpoint(config.out_dir)
        except (FileNotFoundError, ValueError) as e:
            raise TrainingError(f"{e} (--resume continues a run written to --out_dir)") from e
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if not restarts:
        return None
    try:
        saved = load_checkpoint(config.out_dir)
    except (FileNotFoundError, ValueError):
        return None  # none written before the restart: from the start
    if saved.get("run") != run_id() or saved.get("config") != vars(config):
        return None  # another run's checkpoint: never continued without --resume
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"restart {restarts} of this torchrun run: resuming from "
              f"{find_checkpoint(config.out_dir)} (step {saved['step']})")
    return saved


def run_id():
    """torchrun's id of this run (--rdzv_id, a fresh one with --standalone): a restart keeps it."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def model_args(config, saved, init):
    """The model to train: the checkpoint's when resuming (it must be the one asked for), else
    init's (stage 2), else --size's."""
    wanted = (init.args if init is not None
              else ModelArgs(**MODEL_SIZES[config.size]) if config.size else None)
    if saved is None:
        return wanted
    args = ModelArgs(**saved["model_args"])
    if wanted is not None and wanted != args:
        diff = ", ".join(f"{k}={v} (asked: {getattr(wanted, k)})"
                         for k, v in saved["model_args"].items() if getattr(wanted, k) != v)
        raise TrainingError(f"the checkpoint in {config.out_dir} holds a different model: {diff}; "
                            "pass the --size it was trained with or another --out_dir")
    return args


def load_start(model, saved, init):
    """The weights training starts from, before they are split over devices: a ckpt.pt's when
    resuming, else init's (stage 2); a sharded checkpoint's are read later, by resume()."""
    start = saved.get("model") if saved else init.state_dict() if init is not None else None
    if start is not None:
        model.load_state_dict(start)


def resume(saved, model, optimizer, env, out_dir):
    """Optimizer state and RNG from the checkpoint (and a sharded one's weights); metrics logged
    after it are dropped (they are redone). Returns (step, data position)."""
    if "shards" in saved:  # each process reads the part it holds, in whatever layout this run has
        try:
            sharded_checkpoint.load(saved["shards"], model, optimizer, env)
        except ValueError as e:
            raise TrainingError(f"{e} (--resume continues a run written to --out_dir)") from e
    else:  # whole tensors, split like the parameters
        distributed.load_optimizer_state(optimizer, saved["optimizer"], env)
    distributed.set_rng_state(saved["rng"], env)
    metrics = Path(out_dir) / "metrics.jsonl"
    if env.is_main and metrics.exists():
        kept = [line for line in metrics.read_text().splitlines()
                if json.loads(line)["step"] <= saved["step"]]
        metrics.write_text("".join(line + "\n" for line in kept))
    return saved["step"], saved["data_position"]


def save(model, optimizer, env, config, step, data_position, saved_step):
    """This step's checkpoint, of the kind the layout calls for: shards written by every process
    where the weights are split (FSDP2, SPMD: nothing is gathered), else one ckpt.pt written by the
    main process. Every process calls it; it returns step, now the last saved. A save that fails (a
    full disk) stops training with one line and leaves the previous checkpoint as it was."""
    out_dir = Path(config.out_dir)
    meta = dict(model_args=asdict(model.args), step=step, data_position=data_position,
                config=vars(config), run=run_id())
    error = None
    try:
        if distributed.sharded(env):  # every process agrees on the outcome inside
            sharded_checkpoint.save(out_dir, model, optimizer, meta, env)
            return step
        model_state, optim_state = distributed.full_state(model, optimizer, env)
        rng = distributed.rng_states(env)
        if env.is_main:
            save_checkpoint(out_dir / "ckpt.pt", dict(model=model_state, optimizer=optim_state,
                                                      rng=rng, **meta))
            sharded_checkpoint.remove(out_dir)  # an earlier FSDP2 run's, now older than ckpt.pt
    except OSError as e:
        error = e
    # the main process's write, told to all: each stops with the line, none waits for the others
    if not distributed.all_ok(error is None, env):
        error = error or OSError("the main process could not write it")
    if error is not None:
        raise TrainingError(f"could not save the checkpoint of step {step} in {out_dir} "
                            f"({type(error).__name__}: {error}); {last_good(out_dir, saved_step)}. "
                            "Free disk space (or pass another --out_dir), then --resume")
    return step


def last_good(out_dir, saved_step):
    """What a stopped run leaves to --resume from."""
    if saved_step is None:
        return "no checkpoint was written"
    return f"the last good checkpoint {find_checkpoint(out_dir)} (step {saved_step}) is untouched"


def export_hf(out_dir):
    """At the end of training: the final checkpoint's weights in the Hugging Face LLaMA layout, in
    out_dir/hf. The main process reads them from disk, so a sharded run gathers nothing. Written
    into hf.tmp first: a full disk leaves any earlier export and stops with one line."""
    hf, tmp = Path(out_dir) / "hf", Path(out_dir) / "hf.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_hf(load_model(out_dir), tmp)
    except Exception as e:  # safetensors reports a failed write as its own error, not an OSError
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, OSError) and "I/O error" not in str(e):
            raise
        reason = (str(e).splitlines() or [""])[0]
        raise TrainingError(f"could not write the Hugging Face export {hf} ({type(e).__name__}: "
                            f"{reason}); the final checkpoint {find_checkpoint(out_dir)} is "
                            "complete. Free disk space, then --resume (it only exports)") from None
    shutil.rmtree(hf, ignore_errors=True)
    os.replace(tmp, hf)
    print(f"exported the final model to {hf} (Hugging Face LlamaForCausalLM layout)")


# -----------------------------------------------------------------------------
# Hugging Face LlamaForCausalLM directories (LVM's 7B, DeLVM's 300M/1B): the same weights, other
# names


def rename(name, to_hf=False):
    """Map a tensor name between the two layouts; None for names with no counterpart (HF's rotary
    buffers)."""
    for hf, ours in HF_NAMES:
        source, target = (ours, hf) if to_hf else (hf, ours)
        m = re.fullmatch(re.escape(source).replace(r"\{\}", r"(\d+)"), name)
        if m:
            return target.format(*m.groups())
    return None


def _args_from_hf_config(cfg):
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"rope scaling {rope} is not supported; only plain RoPE LLaMA checkpoints "
                         "load")
    n_heads = cfg["num_attention_heads"]
    if cfg.get("head_dim", cfg["hidden_size"] // n_heads) != cfg["hidden_size"] // n_heads:
        raise ValueError("head_dim != hidden_size / num_attention_heads is not supported")
    return ModelArgs(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
                     n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
                     hidden_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
                     norm_eps=cfg.get("rms_norm_eps", 1e-6),
                     rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
                     max_seq_len=cfg.get("max_position_embeddings", 4096))


def _hf_weight_files(path):
    """The weight files of a HF checkpoint dir: safetensors (one file or shards) or
    pytorch_model.bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index_name).exists():
            return sorted(set(json.loads((path / index_name).read_text())["weight_map"].values()))
    files = [n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).exists()][:1]
    if not files:
        raise FileNotFoundError(f"no model.safetensors, pytorch_model.bin or shard index in "
                                f"{path}; download the whole checkpoint directory (e.g. "
                                "`huggingface-cli download Emma02/LVM_ckpts --local-dir DIR`) and "
                                "pass DIR")
    return files


def _hf_config(path):
    cfg = json.loads((path / "config.json").read_text())
    try:
        return cfg, _args_from_hf_config(cfg)
    except KeyError as e:
        raise ValueError(f"{path}/config.json is not a LLaMA config: it lacks {e}") from None


def _hf_args_and_dtype(path):
    """(ModelArgs, the dtype the weights are stored in) without reading the weights: config.json's
    torch_dtype, else the first tensor's header."""
    cfg, args = _hf_config(path)
    name = cfg.get("torch_dtype") or cfg.get("dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return args, getattr(torch, name)
    first = _hf_weight_files(path)[0]
    if first.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(str(path / first), "pt") as f:
            stored = f.get_slice(next(iter(f.keys()))).get_dtype()  # e.g. "BF16", from the header
        return args, {"BF16": torch.bfloat16, "F16": torch.float16}.get(stored, torch.float32)
    return args, torch.float32


def _read_hf(path, dtype=None, quantize=None):
    """(ModelArgs, our state dict) of a Hugging Face LLaMA directory, each file's tensors cast to
    dtype as they are read, so the peak is the model plus one file. quantize: the blocks' linear
    weights quantized one tensor at a time as they are read (infra/quantize.py)."""
    from safetensors.torch import load_file
    cfg, args = _hf_config(path)
    state = {}
    for file in _hf_weight_files(path):
        if quantize and file.endswith(".safetensors"):
            tensors = _read_safetensors(path / file)
        else:
            tensors = (load_file(str(path / file)) if file.endswith(".safetensors") else
                       torch.load(path / file, map_location="cpu", weights_only=True, mmap=True))
            tensors = tensors.items()
        named = ((rename(k), v) for k, v in tensors if rename(k) is not None)
        state.update(quantization.quantize_state(named, quantize, dtype))
        del tensors, named
    if "output.weight" not in state and cfg.get("tie_word_embeddings"):
        state["output.weight"] = state["tok_embeddings.weight"]
    return args, state


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _read_safetensors(file):
    """(name, tensor) of a safetensors file, one tensor at a time, read with plain file reads.
    Not memory-mapped: a mapped file's pages count in the process's memory until it is closed,
    a whole shard (5 GB) on top of a quantized 7B, while a tensor read here is freed once
    quantized."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")  # the format: header length, JSON header, data
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{file}: {name} is stored as {info['dtype']}, not a float type "
                                 "that can be quantized")
            start, end = info["data_offsets"]
            f.seek(8 + n + start)
            data = torch.empty(end - start, dtype=torch.uint8)
            f.readinto(data.numpy())
            yield name, data.view(SAFETENSORS_DTYPES[info["dtype"]]).view(info["shape"])


def save_hf(model, path, dtype=None, max_shard_bytes=5 * 2**30):
    """Write a directory that transformers' LlamaForCausalLM.from_pretrained (and load_model)
    reads."""
    from safetensors.torch import save_file
    a, path = model.args, Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {rename(k, to_hf=True): v.detach().to(dtype or v.dtype).contiguous().cpu()
               for k, v in model.state_dict().items()}
    dtype_name = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(hf_config(a, dtype_name), indent=2))
    shards, size = [{}], 0  # files of at most max_shard_bytes, as HF splits big models
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name], size = t, size + nbytes
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def hf_config(a, dtype_name):
    """config.json of a LlamaForCausalLM with these ModelArgs, weights stored in dtype_name."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.dim,
            "intermediate_size": a.hidden_dim, "num_hidden_layers": a.n_layers,
            "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads,
            "vocab_size": a.vocab_size, "rms_norm_eps": a.norm_eps, "rope_theta": a.rope_theta,
            "max_position_embeddings": a.max_seq_len, "hidden_act": "silu",
            "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
            "torch_dtype": dtype_name, "initializer_range": a.init_std}
