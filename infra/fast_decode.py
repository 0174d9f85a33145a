"""
Opt-in speed for generation: sample.generate(..., compile=True) and `sample.py --compile`. The same
tokens as the eager loop (a test checks it, token for token); only how fast they come changes:

- the decode step, model and sampling, is compiled once per process with fixed shapes: CUDA graphs
  on a GPU (one replay per token instead of hundreds of kernel launches), generated C++ on a CPU;
- sampling runs inside the graph (sample.next_token_probabilities, then the exponential race); the
  race's Exp(1) noise is drawn outside, from the caller's generator and in the order the eager loop
  draws it;
- the key/value cache is rounded up to a multiple of 256 tokens and kept between calls, so nearby
  lengths reuse one graph (and its CUDA graphs); the causal mask hides the extra slots;
- the guards (the checks that a call still fits the compiled graph) run on each call's first step
  only: the later steps make the very same call;
- on a CPU a single row through a Linear becomes multiply-and-sum, which the compiler fuses into one
  pass over the weight at memory speed (the BLAS matrix-vector product it would call streams the
  weight several times slower on some CPUs: bench/sample.py times both).
"""
import contextlib
import math

import torch
import torch.nn as nn

CACHE_ROUNDING = 256
_compiled = {}  # the compiled decode step, built once per process


class MatVecLinear(nn.Linear):
    """nn.Linear (no bias) whose single-row product, inside a compiled graph, is written as
    multiply-and-sum. Only ever the class of an existing nn.Linear, swapped in by matvec_linears:
    the same weights, the same state dict."""

    def forward(self, x):
        if torch.compiler.is_compiling() and x.shape[:-1].numel() == 1:
            return (x.unsqueeze(-2) * self.weight).sum(-1)
        return super().forward(x)


@contextlib.contextmanager
def matvec_linears(model):
    """The model's bias-free nn.Linear modules are MatVecLinear inside the block, nn.Linear again
    after."""
    linears = [m for m in model.modules() if type(m) is nn.Linear and m.bias is None]
    for m in linears:
        m.__class__ = MatVecLinear
    try:
        yield
    finally:
        for m in linears:
            m.__class__ = nn.Linear


def num_candidates(vocab_size, top_k, codebook_size):
    """How many tokens sample_next draws among, the width of its noise: top_k, or every allowed
    id."""
    allowed = min(vocab_size, codebook_size or vocab_size)
    return min(top_k, allowed) if top_k else allowed


def decode_step(probabilities):
    """sample.decode_one_token with the exponential race's Exp(1) draws passed in as noise (None:
    greedy), for probabilities = sample.next_token_probabilities: what is compiled."""
    def step(model, token, input_pos, noise, temperature, top_k, codebook_size):
        logits = model(token, input_pos=input_pos)[0][:, -1]
        if noise is None:
            return logits[:, :codebook_size].argmax(-1)
        probs, ids = probabilities(logits, temperature, top_k, codebook_size)
        choice = (probs / noise).argmax(-1)
        return choice if ids is None else ids.gather(-1, choice[:, None]).squeeze(-1)
    return step


def compile_step(probabilities, device):
    """The decode step compiled once per process: CUDA graphs on GPU, the C++ wrapper on CPU; fixed
    shapes."""
    if probabilities not in _compiled:
        how = (dict(mode="reduce-overhead") if device.type == "cuda"
               else dict(options={"cpp_wrapper": True}))
        _compiled[probabilities] = torch.compile(decode_step(probabilities), fullgraph=True,
                                                 dynamic=False, **how)
    return _compiled[probabilities]


class CompiledStep:
    """A decode step of sample.decode_one_token's signature, (model, token [B, 1], input_pos [1],
    temperature, top_k, codebook_size, generator) -> the next token [B], run compiled; one per
    generate call."""

    def __init__(self, probabilities, device, stack):
        self.compiled, self.device = compile_step(probabilities, device), device
        self.stack = stack
        self.noise, self.guarded = None, True

    def __call__(self, model, token, input_pos, temperature=1.0, top_k=100, codebook_size=None,
                 generator=None):
        noise = None
        if temperature > 1e-5:  # the draws sample_next would make, in the same order
            if self.noise is None:
                n = num_candidates(model.args.vocab_size, top_k, codebook_size)
                self.noise = torch.empty(token.shape[0], n, device=self.device)
            noise = self.noise.exponential_(1, generator=generator)
        # a copy: a CUDA graph overwrites its output when it replays
        token = self.compiled(model, token, input_pos, noise, temperature, top_k,
                              codebook_size).clone()
        if self.guarded:  # this first step checked the guards; the rest of the call skips them
            self.stack.enter_context(torch.compiler.set_stance(skip_guard_eval_unsafe=True))
            self.guarded = False
        return token


@contextlib.contextmanager
def compiled_step(model, batch_size, length, probabilities):
    """For one generate call of `length` tokens: the cache (rounded up, kept for the next call) and
    the CompiledStep that samples from probabilities (sample.next_token_probabilities)."""
    device, dtype = model.output.weight.device, model.output.weight.dtype
    length = min(model.args.max_seq_len, math.ceil(length / CACHE_ROUNDING) * CACHE_ROUNDING)
    kv = model.layers[0].attention.kv_cache
    if kv is None or (kv.k.shape[0], kv.k.shape[2], kv.k.dtype) != (batch_size, length, dtype):
        model.setup_cache(batch_size, length)
    with contextlib.ExitStack() as stack:  # on leaving: guards on again, the Linears restored
        if device.type == "cpu":
            stack.enter_context(matvec_linears(model))
        yield CompiledStep(probabilities, device, stack)
