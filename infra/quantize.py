"""
Opt-in weight-only quantization for generation: `load_model(..., quantize="int8")` and
`sample.py / evaluate.py --quantize int8`. Decoding one token reads every weight once, so on a CPU
(and on a GPU at batch 1) its speed is set by the bytes per weight: bfloat16 reads 2, int8 1, int4
half of one.

- which weights: the seven linear layers of every block (wq wk wv wo w1 w2 w3), over 99% of a 7B's
  bytes; the embedding (one row read per token) and the output head (0.5%) stay in the compute
  dtype, which also keeps the dtype that model.py and sample.py read from `model.output.weight`;
- int8: each output channel (row) of a weight gets its own scale, w ~ q * s with q in [-127, 127]
  and s = max|row| / 127: one large weight spoils the precision of its row only;
- int4: groups of 128 inputs in a row get a scale and an offset, w ~ q * s + m with q in [0, 15]
  (asymmetric: 16 levels are too few to give half of them to a sign the group may not use); on a
  CPU only;
- activations stay in the compute dtype (bfloat16 or float32): only the weights are dequantized,
  inside torch's int8/int4 matrix-vector kernels where the device has them, so no bfloat16 copy of
  a weight is ever written.

The weights are quantized as they are read (checkpoint.load_model), so loading never holds the
unquantized model; model.py does not change: quantize_model swaps the linear modules in place.
"""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ("int8", "int4")
INT4_GROUP = 128
PREFILL_ROWS = 128  # from this many rows (tokens) on, int8 dequantizes into F.linear: see Int8Linear
# the names (in our layout) of the weights that are quantized: the blocks' linear layers
QUANTIZED = re.compile(r"layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])\.weight")


def check_mode(mode, device=None):
    """None or one of MODES, usable on device; otherwise a ValueError of one line."""
    if mode is None:
        return None
    if mode not in MODES:
        raise ValueError(f"--quantize {mode}: choose int8 or int4 (or leave it out for the "
                         "checkpoint's own dtype)")
    if mode == "int4" and device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"--quantize int4 runs on a CPU only (no int4 kernel is wired for "
                         f"{torch.device(device).type} here); use --quantize int8")
    return mode


def bytes_per_weight(mode):
    """Memory of one quantized weight, its share of the scales included (int4: 2 bfloat16 a
    group)."""
    return {"int8": 1 + 2 / 4096, "int4": 0.5 + 4 / INT4_GROUP}[mode]


# -----------------------------------------------------------------------------
# the two quantizations: a float weight [out, in] -> the tensors a quantized module holds


def int8_weight(weight, dtype):
    """(q int8 [out, in], scale [out] in dtype) with weight ~ q * scale[:, None]."""
    w = weight.to(torch.float32, copy=True)  # one copy (never the caller's), then in place
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # a zero row keeps a usable scale
    q = w.div_(scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale.to(dtype)


def int4_weight(weight, dtype, group=INT4_GROUP):
    """(q [out, in] with values 0..15, scales_and_zeros [in / group, out, 2] in dtype): weight ~
    (q - 8) * scale + zero for each group of `group` inputs, the form torch's int4 kernels take (the
    zero is the value of q = 8, the middle of the range)."""
    out, inp = weight.shape
    if inp % group:
        raise ValueError(f"int4 needs the input width ({inp}) to divide by the group ({group})")
    w = weight.to(torch.float32, copy=True).reshape(out, inp // group, group)  # in place after
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = w.sub_(low[..., None]).div_(scale[..., None]).round_().clamp_(0, 15)
    zero = low + 8 * scale
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
    return q.reshape(out, inp).to(torch.int32), scales_and_zeros.to(dtype)


# -----------------------------------------------------------------------------
# the modules that replace nn.Linear: same input and output, quantized weights


class Int8Linear(nn.Module):
    """y = x W^T with W stored as int8 and a scale per output channel. Decoding on a CPU (a few
    rows): torch's _weight_int8pack_mm reads the int8 weight directly. Prefill (many rows: compute,
    not memory, bound; that kernel was 3x slower than bfloat16 at 768 rows on this project's CPU)
    and other devices: the weight dequantized into F.linear's input (a compiled graph fuses the
    two)."""

    def __init__(self, weight, scale):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)

    def forward(self, x):
        if x.device.type == "cpu" and x.numel() < PREFILL_ROWS * x.shape[-1]:
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight,
                                                   self.scale)
            return y.reshape(*x.shape[:-1], -1)
        return F.linear(x, self.weight.to(x.dtype)) * self.scale


class Int4Linear(nn.Module):
    """y = x W^T with W in 4 bits, packed by torch for its CPU kernel (two weights a byte), and a
    scale and a zero per group of 128 inputs."""

    def __init__(self, packed, scales_and_zeros, out_features):
        super().__init__()
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.out_features = out_features

    def forward(self, x):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, x.shape[-1]), self.weight, INT4_GROUP, self.scales_and_zeros)
        return y.reshape(*x.shape[:-1], self.out_features)


def quantize_weight(name, weight, mode, dtype):
    """The state-dict entries that replace `name` (a weight QUANTIZED matches) in a model quantized
    in mode, with the compute dtype's scales."""
    prefix = name.removesuffix("weight")
    if mode == "int8":
        q, scale = int8_weight(weight, dtype)
        return {name: q, prefix + "scale": scale}
    q, scales_and_zeros = int4_weight(weight, dtype)
    # the CPU kernel's own layout (2 weights a byte); 1: the tiling it expects on a CPU
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return {name: packed, prefix + "scales_and_zeros": scales_and_zeros}


def quantize_state(tensors, mode, dtype):
    """A state dict from (name, tensor) pairs, the QUANTIZED weights quantized one at a time as they
    come (the caller's reader frees each float tensor once it is replaced), the others cast to
    dtype."""
    state = {}
    for name, tensor in tensors:
        if mode and QUANTIZED.fullmatch(name):
            state.update(quantize_weight(name, tensor, mode, dtype or tensor.dtype))
        else:
            state[name] = tensor.to(dtype or tensor.dtype)
        del tensor
    return state


def stored_mode(state):
    """The quantization a state dict already holds (a saved quantized model), or None."""
    if any(k.endswith(".scales_and_zeros") for k in state):
        return "int4"
    return "int8" if any(k.endswith(".scale") for k in state) else None


def swap_linears(model, mode, state=None):
    """Replace the QUANTIZED linear modules of a model by quantized ones, holding state's tensors
    (for loading: built on the meta device, then given the real tensors) or placeholders of their
    shapes."""
    for name, module in list(model.named_modules()):
        if not QUANTIZED.fullmatch(name + ".weight"):
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"the model is quantized already ({name} is "
                             f"{type(module).__name__}): load it without --quantize")
        parent, child = name.rsplit(".", 1)
        if state is None:
            tensors = quantize_weight(name + ".weight", module.weight.detach(), mode,
                                      module.weight.dtype)
        else:
            tensors = {k: state[k] for k in state if k.startswith(name + ".")}
        if mode == "int8":
            new = Int8Linear(tensors[name + ".weight"], tensors[name + ".scale"])
        else:
            new = Int4Linear(tensors[name + ".weight"], tensors[name + ".scales_and_zeros"],
                             module.out_features)
        setattr(model.get_submodule(parent), child, new)
    return model


@torch.no_grad()
def quantize_model(model, mode):
    """A model's blocks' linear layers quantized in place (mode "int8" or "int4"); the model is
    returned. For a model already in memory; load_model(..., quantize=) quantizes as it reads."""
    check_mode(mode, model.output.weight.device)
    if mode is None:
        return model
    return swap_linears(model, mode)
