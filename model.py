"""
The LVM-Lite decoder: a LLaMA-2 style transformer over VQ-GAN image tokens.

Read top to bottom: ModelArgs -> RMSNorm -> rotary embeddings -> Attention (with an optional KV
cache for generation) -> FeedForward (SwiGLU) -> TransformerBlock -> Transformer. Then the things
users need around it: the paper's FLOP count (Table 4), the AdamW set-up (Table 8) and
loading/saving Hugging Face LLaMA checkpoints (how LVM's released 7B model and DeLVM's models are
shared).

    python model.py --size 300M      # parameter count and forward TFLOPs at 256 and 4096 tokens
"""
import argparse
import json
import math
import os
import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    dim: int = 1024  # hidden size (Table 7)
    n_layers: int = 22
    n_heads: int = 8
    n_kv_heads: int | None = None  # grouped-query attention when < n_heads; None means n_heads
    hidden_dim: int = 2688  # SwiGLU MLP width (Table 7 "MLP dim")
    # VQ-GAN codebook size (LVM's released 7B uses 8292: 8192 codes + 100 unused)
    vocab_size: int = 8192
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 4096  # longest sequence: 16 images x 256 tokens in stage 2
    init_std: float = 0.02

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim} must divide by n_heads {self.n_heads}, "
                             f"and n_heads by n_kv_heads {self.n_kv_heads}")

    @property
    def head_dim(self):
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * g, computed in float32 for stability under bf16."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32:  # one fused kernel (the same float32 arithmetic)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def precompute_rope(head_dim, max_seq_len, theta=10000.0, device=None):
    """Rotary position embedding tables: angle(pos, i) = pos * theta^(-2i/head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
                                / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    # [T, head_dim] in the "rotate half" layout of HF LLaMA; sin's first half negated for
    # apply_rope's swap
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x, cos, sin):
    """Rotate each pair (x_i, x_{i+d/2}) by its position's angle: (a, b) ->
    (a cos - b sin, b cos + a sin). x: [B, H, T, hd]; cos/sin: [T, hd]. Pairing i with i + d/2
    (not 2i with 2i+1) lets Hugging Face LLaMA weights load without permuting; rolling by d/2 swaps
    the halves, and sin carries the minus sign."""
    return (x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin).to(x.dtype)


class KVCache(nn.Module):
    """Preallocated keys/values for incremental decoding, written in place at input_pos
    (no reallocation)."""

    def __init__(self, batch_size, max_seq_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v


class Linear(nn.Linear):
    """y = x W^T, no bias (nn.Linear's weight layout: checkpoints load as they are). In a compiled
    CPU graph a single row (batch-1 decoding) is written as multiply-and-sum, which the compiler
    fuses into one pass over W at memory speed; the BLAS matrix-vector product it would call instead
    streams W several times slower on some CPUs (bench/sample.py times both)."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        if torch.compiler.is_compiling() and x.device.type == "cpu" and x.shape[:-1].numel() == 1:
            return (x.unsqueeze(-2) * self.weight).sum(-1)
        return F.linear(x, self.weight)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = Linear(args.dim, args.n_heads * self.head_dim)
        self.wk = Linear(args.dim, args.n_kv_heads * self.head_dim)
        self.wv = Linear(args.dim, args.n_kv_heads * self.head_dim)
        self.wo = Linear(args.n_heads * self.head_dim, args.dim)
        self.kv_cache = None

    def forward(self, x, cos, sin, input_pos=None, mask=None, kv_len=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None and input_pos is not None:
            # attend over the first kv_len cache slots (the filled ones), or the whole static
            # cache (a compiled step's fixed shapes; the mask hides the future)
            k, v = self.kv_cache.update(input_pos, k, v)
            k, v = k[:, :, :kv_len], v[:, :, :kv_len]
        # grouped-query attention: each kv head serves n_heads/n_kv_heads queries
        if self.n_kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        # softmax(q k^T / sqrt(d)) v with a causal mask; flash kernels on GPU. No mask: the queries
        # are the last T keys, so causal when they are all of them, and one new token sees every key
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w1 = Linear(dim, hidden_dim)
        self.w2 = Linear(hidden_dim, dim)
        self.w3 = Linear(dim, hidden_dim)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: h = x + Attn(RMSNorm(x)); out = h + FFN(RMSNorm(h))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)

    def forward(self, x, cos, sin, input_pos=None, mask=None, kv_len=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos, mask, kv_len)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # untied from the input embedding
        self.output = Linear(args.dim, args.vocab_size)
        self.init_rope()
        self.apply(self._init_weights)
        # GPT-2 style: residual projections scaled by 1/sqrt(2 * n_layers)
        for name, p in self.named_parameters():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=args.init_std / math.sqrt(2 * args.n_layers))
        self.causal_mask = None  # [max_cache_len, max_cache_len] bool, built by setup_cache

    def init_rope(self, device=None):
        cos, sin = precompute_rope(self.args.head_dim, self.args.max_seq_len,
                                   self.args.rope_theta, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.args.init_std)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, input_pos=None, kv_len=None):
        """idx: [B, T] token ids. Training: positions 0..T-1, returns (logits [B, T, V], mean
        cross-entropy). Generation: input_pos [T] gives the absolute positions of idx; keys/values
        go into the cache, and only the last position's logits [B, 1, V] come back (all that
        choosing the next token needs). kv_len: the cache slots filled once idx is in, idx being the
        last T of them (positions kv_len - T ... kv_len - 1): attention reads those slots only (less
        memory per token); None reads the whole cache, the fixed shapes a compiled step needs."""
        T = idx.shape[1]
        if input_pos is None:
            if T > self.args.max_seq_len:
                raise ValueError(f"sequence of {T} tokens is longer than max_seq_len "
                                 f"{self.args.max_seq_len}")
            cos, sin, mask = self.rope_cos[:T], self.rope_sin[:T], None
        else:
            if self.causal_mask is None:
                raise RuntimeError("call model.setup_cache(batch_size, max_seq_len) before "
                                   "decoding with input_pos")
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
            # [T, kv_len]: position p sees cache slots <= p. Not needed when idx fills the cache
            # (causal, as in training) or is one token after the filled slots (it sees them all)
            mask = None
            if kv_len is None or 1 < T < kv_len:
                mask = self.causal_mask[input_pos, :kv_len]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, mask, kv_len)
        if input_pos is not None:  # generating: the output head on the last position only
            x = x[:, -1:]
        logits = self.output(self.norm(x))
        loss = None
        if targets is not None:  # the autoregressive loss: mean of -log p(z_{m+1} | z_{1..m})
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    def setup_cache(self, batch_size, max_seq_len, dtype=None, device=None):
        """Allocate the key/value cache once, for sequences of up to max_seq_len tokens."""
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"cache of {max_seq_len} tokens exceeds max_seq_len "
                             f"{self.args.max_seq_len}")
        weight = self.output.weight
        dtype, device = dtype or weight.dtype, device or weight.device
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch_size, max_seq_len, self.args.n_kv_heads,
                                               self.args.head_dim, dtype, device)
        self.causal_mask = torch.ones(max_seq_len, max_seq_len, dtype=torch.bool,
                                      device=device).tril()

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.causal_mask = None


def estimate_flops(args: ModelArgs, seq_len):
    """Forward FLOPs for one sequence (Table 4's count): 2 per multiply-add in every matmul, output
    head included, plus 4 * L^2 * d per layer for attention scores (q k^T) and their weighted sum of
    values."""
    d, kv_dim = args.dim, args.n_kv_heads * args.head_dim
    per_layer = 2 * d * d + 2 * d * kv_dim + 3 * d * args.hidden_dim  # wq, wo, wk, wv, w1, w2, w3
    matmul_params = args.n_layers * per_layer + d * args.vocab_size
    return 2 * matmul_params * seq_len + 4 * args.n_layers * seq_len * seq_len * d


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
# Hugging Face LlamaForCausalLM checkpoints (LVM's 7B, DeLVM's 300M/1B): same weights, other names.

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


def rename(name, to_hf=False):
    """Map a tensor name between the two layouts; None for names with no counterpart
    (HF's rotary buffers)."""
    for hf, ours in HF_NAMES:
        source, target = (ours, hf) if to_hf else (hf, ours)
        m = re.fullmatch(re.escape(source).replace(r"\{\}", r"(\d+)"), name)
        if m:
            return target.format(*m.groups())
    return None


def _args_from_hf_config(cfg):
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"rope scaling {rope} is not supported; only plain RoPE LLaMA "
                         "checkpoints load")
    n_heads = cfg["num_attention_heads"]
    if cfg.get("head_dim", cfg["hidden_size"] // n_heads) != cfg["hidden_size"] // n_heads:
        raise ValueError("head_dim != hidden_size / num_attention_heads is not supported")
    return ModelArgs(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
                     n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
                     hidden_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
                     norm_eps=cfg.get("rms_norm_eps", 1e-6),
                     rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
                     max_seq_len=cfg.get("max_position_embeddings", 4096))


def _read_hf_tensors(path):
    """Yield (name, tensor) from a HF checkpoint dir: safetensors (single or sharded) or
    pytorch_model.bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if os.path.exists(os.path.join(path, index_name)):
            with open(os.path.join(path, index_name)) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            break
    else:
        files = [n for n in ("model.safetensors", "pytorch_model.bin")
                 if os.path.exists(os.path.join(path, n))][:1]
    if not files:
        raise FileNotFoundError("no model.safetensors, pytorch_model.bin or shard index "
                                f"in {path}; download the whole checkpoint directory (e.g. "
                                "`huggingface-cli download Emma02/LVM_ckpts --local-dir DIR`) "
                                "and pass DIR")
    for file in files:
        full = os.path.join(path, file)
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file
            yield from load_file(full).items()
        else:  # weights_only: a checkpoint must never run code
            yield from torch.load(full, map_location="cpu", weights_only=True, mmap=True).items()


def load_hf(path, dtype=None, device="cpu"):
    """Build a Transformer from a Hugging Face LlamaForCausalLM directory (config.json +
    weights)."""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: pass a Hugging Face LLaMA "
                                "checkpoint directory")
    with open(config_path) as f:
        cfg = json.load(f)
    args = _args_from_hf_config(cfg)
    with torch.device("meta"):  # no memory for random weights we would overwrite (matters at 7B)
        model = Transformer(args)
    state = {}
    for name, tensor in _read_hf_tensors(path):
        ours = rename(name)
        if ours is not None:
            state[ours] = tensor.to(device=device, dtype=dtype or tensor.dtype)
    if "output.weight" not in state and cfg.get("tie_word_embeddings"):
        state["output.weight"] = state["tok_embeddings.weight"]
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} tensors, e.g. "
                         f"{sorted(missing)[:3]}")
    model.load_state_dict(state, strict=True, assign=True)
    model.init_rope(device)
    return model.eval()


def save_hf(model, path, dtype=None, max_shard_bytes=5 * 2**30):
    """Write a directory that transformers' LlamaForCausalLM.from_pretrained (and load_hf) reads."""
    from safetensors.torch import save_file
    a = model.args
    os.makedirs(path, exist_ok=True)
    tensors = {rename(k, to_hf=True): v.detach().to(dtype or v.dtype).contiguous().cpu()
               for k, v in model.state_dict().items()}
    dtype_name = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.dim,
              "intermediate_size": a.hidden_dim, "num_hidden_layers": a.n_layers,
              "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads,
              "vocab_size": a.vocab_size, "rms_norm_eps": a.norm_eps, "rope_theta": a.rope_theta,
              "max_position_embeddings": a.max_seq_len, "hidden_act": "silu",
              "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
              "torch_dtype": dtype_name, "initializer_range": a.init_std}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shards, size = [{}], 0  # split into files of at most max_shard_bytes, as HF does for big models
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name], size = t, size + nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def main():
    from configs import MODEL_SIZES, TABLE4_TFLOPS, TABLE7_PARAMS_M
    parser = argparse.ArgumentParser(description="Print a model size's parameter count and "
                                                 "forward FLOPs.")
    parser.add_argument("--size", default="300M", choices=sorted(MODEL_SIZES),
                        help="a config in configs/")
    size = parser.parse_args().size
    args = ModelArgs(**MODEL_SIZES[size])
    with torch.device("meta"):
        n_params = Transformer(args).num_params()
    print(f"model {size}: " + ", ".join(f"{f.name}={getattr(args, f.name)}" for f in fields(args)))
    paper = f" (paper: {TABLE7_PARAMS_M[size]}M)" if size in TABLE7_PARAMS_M else ""
    print(f"parameters: {n_params / 1e6:.1f}M{paper}")
    for seq_len in (256, 4096):
        tflops = estimate_flops(args, seq_len) / 1e12
        paper = f" (Table 4: {TABLE4_TFLOPS[size][seq_len]})" if size in TABLE4_TFLOPS else ""
        print(f"forward TFLOPs, batch 1, {seq_len} tokens: {tflops:.2f}{paper}")


if __name__ == "__main__":
    main()
