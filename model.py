"""
The LVM-Lite decoder: a LLaMA-2 style transformer over VQ-GAN image tokens (paper 2.1).

Read top to bottom: ModelArgs -> RMSNorm -> rotary embeddings -> the key/value cache -> Attention ->
FeedForward (SwiGLU) -> TransformerBlock -> Transformer, then the paper's FLOP count (Table 4).
Training calls model(idx, targets); generation (sample.py) fills the cache with model(idx,
input_pos=...). Loading and saving checkpoints (ours, Hugging Face LLaMA directories such as LVM's
7B): infra/checkpoint.py.

    python model.py --size 300M      # parameter count and forward TFLOPs at 256 and 4096 tokens
"""
import argparse
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from configs import MODEL_SIZES, TABLE4_TFLOPS, TABLE7_PARAMS_M


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


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.kv_cache = None

    def forward(self, x, cos, sin, mask=None, input_pos=None):
        """x [B, T, dim] at the positions of cos/sin. Training: mask None, causal over the T tokens.
        Generation: input_pos [T] and mask [1, 1, T, cache length]; the T new keys/values join the
        cache and the queries attend to every cache slot the mask lets them see."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        # grouped-query attention: each kv head serves n_heads/n_kv_heads queries
        if self.n_kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        # softmax(q k^T / sqrt(d)) v, each position seeing itself and the positions before it
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

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

    def forward(self, x, cos, sin, mask=None, input_pos=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # untied from the input embedding
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
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

    def forward(self, idx, targets=None, input_pos=None):
        """idx: [B, T] token ids. Training: positions 0..T-1; returns (logits [B, T, V], the mean
        cross-entropy against targets, or None). Generation: input_pos [T] gives the positions of
        idx in the cache (setup_cache first); their keys/values go into it, and only the last
        position's logits [B, 1, V] come back (all that choosing the next token needs)."""
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
            # position p sees the cache slots 0..p: row p of the causal mask
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
            mask = self.causal_mask[None, None, input_pos]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos)
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


def main():
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
