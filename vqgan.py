"""
The image tokenizer (paper 2.1): a VQ-GAN maps pixels in [0, 1] to a grid of codebook indices and
back.

The network is open-muse's taming-style VQGANModel, LVM's released tokenizer (Emma02/vqvae_ckpts),
parameter for parameter: infra/vqgan_checkpoint.py reads its checkpoints as they are.

    tokenizer = load_pretrained("path/to/vqvae_ckpts")  # from infra.vqgan_checkpoint
    codes = tokenizer.encode(pixels)        # float [B, 3, H, W] in [0, 1] -> int64 [B, (H/f)*(W/f)]
    pixels = tokenizer.decode(codes)        # -> float [B, 3, H, W], not clamped
    tokens = images_to_tokens(tokenizer, images)  # uint8 or float images -> codes, as the LLM reads

Read top to bottom: configs, the network (encoder, decoder, quantizer), images <-> tokens.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# open-muse config.json field names. 'f16-8192' is the released LVM tokenizer (146.2M parameters).
CONFIGS = {
    "f16-8192": dict(resolution=256, num_channels=3, hidden_channels=128,
                     channel_mult=[1, 2, 2, 4, 6], num_res_blocks=2, attn_resolutions=[],
                     no_attn_mid_block=True, z_channels=64, num_embeddings=8192,
                     quantized_embed_dim=64, dropout=0.0, resample_with_conv=True,
                     commitment_cost=0.25),
    # toy world: 32x32 images -> 4x4 = 16 codes (f=8) from 512. A patch codec: each code comes from
    # its own 8x8 patch and paints it back (PatchEncoder/PatchDecoder); data-dependent init
    # (PCA, k-means) does most of the work
    "toy": dict(resolution=32, num_channels=3, hidden_channels=16, channel_mult=[1, 2, 2, 4],
                num_res_blocks=1, attn_resolutions=[], no_attn_mid_block=True, z_channels=64,
                num_embeddings=512, quantized_embed_dim=64, dropout=0.0, resample_with_conv=False,
                commitment_cost=0.25, norm_groups=8, patch_encoder=True, patch_decoder=True),
}
# our fields beyond open-muse's, with the released model's behaviour as default. GroupNorm needs
# several channels per group: with one, every channel is zero-mean per image and the decoder cannot
# output the image's mean colour.
EXTRA_FIELDS = dict(norm_groups=32, l2_normalize_codes=False, patch_encoder=False,
                    patch_decoder=False)

# -----------------------------------------------------------------------------
# the network (train one from scratch: tools/vqgan_train.py)


def Normalize(channels, groups):
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, config):
        super().__init__()
        self.norm1, self.conv1 = (Normalize(cin, config["norm_groups"]),
                                  nn.Conv2d(cin, cout, 3, padding=1))
        self.norm2, self.conv2 = (Normalize(cout, config["norm_groups"]),
                                  nn.Conv2d(cout, cout, 3, padding=1))
        self.dropout = nn.Dropout(config["dropout"])
        # a 1x1 projection where the width changes, so the residual matches it
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class Downsample(nn.Module):
    def __init__(self, channels, with_conv):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2) if with_conv else None

    def forward(self, x):
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        # asymmetric zero pad (right, bottom) then a stride-2 conv with no padding
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels, with_conv):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else nn.Identity()

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels, config):
    mid = nn.Module()
    mid.block_1, mid.block_2 = (ResnetBlock(channels, channels, config),
                                ResnetBlock(channels, channels, config))
    return mid


class Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        ch, mult, n = config["hidden_channels"], config["channel_mult"], len(config["channel_mult"])
        self.conv_in = nn.Conv2d(config["num_channels"], ch, 3, padding=1)
        self.down = nn.ModuleList()
        for i in range(n):  # level i works at resolution / 2**i with ch * mult[i] channels
            level, cin = nn.Module(), ch * ([1] + list(mult))[i]
            level.block = nn.ModuleList(
                [ResnetBlock(cin if j == 0 else ch * mult[i], ch * mult[i], config)
                 for j in range(config["num_res_blocks"])])
            level.downsample = (Downsample(ch * mult[i], config["resample_with_conv"])
                                if i < n - 1 else nn.Identity())  # the lowest level keeps its size
            self.down.append(level)
        self.mid = _mid(ch * mult[-1], config)
        self.norm_out = Normalize(ch * mult[-1], config["norm_groups"])
        self.conv_out = nn.Conv2d(ch * mult[-1], config["z_channels"], 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            h = level.downsample(h)
        h = self.mid.block_2(self.mid.block_1(h))
        return self.conv_out(F.silu(self.norm_out(h)))


class PatchEncoder(nn.Module):
    """Each f x f patch alone -> one latent, by a linear projection (a convolution with kernel =
    stride = f). A code then depends on its own patch only, so a flat colour has exactly one code.
    (The taming encoder's 3x3 convolutions and GroupNorm let a code depend on the patch's
    surroundings: synonym codes that the decoder renders alike but a sequence model must still
    predict.)"""

    def __init__(self, config):
        super().__init__()
        f = 2 ** (len(config["channel_mult"]) - 1)
        self.conv_in = nn.Conv2d(config["num_channels"], config["z_channels"], f, stride=f)

    def forward(self, x):
        return self.conv_in(x)


class PatchDecoder(nn.Module):
    """The mirror of PatchEncoder: a transposed convolution (kernel = stride = f) paints a patch."""

    def __init__(self, config):
        super().__init__()
        f = 2 ** (len(config["channel_mult"]) - 1)
        self.conv_out = nn.ConvTranspose2d(config["z_channels"], config["num_channels"], f,
                                           stride=f)

    def forward(self, z):
        return self.conv_out(z)


class Decoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        ch, mult, n = config["hidden_channels"], config["channel_mult"], len(config["channel_mult"])
        self.conv_in = nn.Conv2d(config["z_channels"], ch * mult[-1], 3, padding=1)
        self.mid = _mid(ch * mult[-1], config)
        self.up = nn.ModuleList()
        # up[i] is the level at resolution index i (up[n-1] is the lowest); run from n-1 down to 0
        for i in range(n):
            level, cin = nn.Module(), ch * mult[min(i + 1, n - 1)]
            level.block = nn.ModuleList(
                [ResnetBlock(cin if j == 0 else ch * mult[i], ch * mult[i], config)
                 for j in range(config["num_res_blocks"] + 1)])
            level.upsample = (Upsample(ch * mult[i], config["resample_with_conv"]) if i > 0
                              else nn.Identity())  # the highest level is the image's size
            self.up.append(level)
        self.norm_out = Normalize(ch * mult[0], config["norm_groups"])
        self.conv_out = nn.Conv2d(ch * mult[0], config["num_channels"], 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, num_embeddings, dim, beta, l2_normalize=False):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, dim)
        self.embedding.weight.data.uniform_(-1.0 / num_embeddings, 1.0 / num_embeddings)
        self.beta, self.l2_normalize = beta, l2_normalize

    def codebook(self):
        e = self.embedding.weight
        return F.normalize(e, dim=1) if self.l2_normalize else e

    def nearest(self, z):
        """z [B, D, h, w] -> codes int64 [B, h*w], row-major over the grid."""
        B, D, h, w = z.shape
        zf = z.permute(0, 2, 3, 1).reshape(-1, D).float()
        zf = F.normalize(zf, dim=1) if self.l2_normalize else zf
        e = self.codebook().float()
        # paper eq. 1, nearest codebook entry:
        # argmin_k ||z - e_k||^2 = ||z||^2 + ||e_k||^2 - 2 z.e_k
        d = zf.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * zf @ e.t()
        return d.argmin(1).view(B, h * w)

    def lookup(self, codes, h, w):
        """codes [B, h*w] -> code vectors [B, D, h, w]."""
        return (F.embedding(codes, self.codebook()).view(codes.shape[0], h, w, -1)
                .permute(0, 3, 1, 2))

    def forward(self, z):
        codes = self.nearest(z)
        zq = self.lookup(codes, z.shape[2], z.shape[3])
        z = F.normalize(z, dim=1) if self.l2_normalize else z
        # VQ-VAE loss: codebook term ||sg[z] - e||^2 + beta * commitment term ||z - sg[e]||^2
        # (open-muse/taming put beta on the codebook term instead; it only matters for training,
        # never for loading or encoding)
        loss = F.mse_loss(zq, z.detach()) + self.beta * F.mse_loss(z, zq.detach())
        # straight-through estimator: decoder gradient flows to the encoder unchanged
        zq = z + (zq - z).detach()
        return zq, loss, codes


class VQGAN(nn.Module):
    def __init__(self, config):
        super().__init__()
        config = {**CONFIGS["f16-8192"], **EXTRA_FIELDS,
                  **{k: v for k, v in config.items() if not k.startswith("_")}}
        if config["attn_resolutions"] or not config["no_attn_mid_block"]:
            raise ValueError("this VQGAN has no attention blocks (the released LVM tokenizer "
                             "has none); set attn_resolutions=[] and no_attn_mid_block=true")
        widths = [config["hidden_channels"] * m for m in config["channel_mult"]]
        if any(width % config["norm_groups"] for width in widths):
            raise ValueError("hidden_channels * channel_mult must be multiples of norm_groups "
                             f"({config['norm_groups']})")
        self.config = config
        self.downsample_factor = 2 ** (len(config["channel_mult"]) - 1)
        self.encoder = (PatchEncoder if config["patch_encoder"] else Encoder)(config)
        self.decoder = (PatchDecoder if config["patch_decoder"] else Decoder)(config)
        self.quant_conv = nn.Conv2d(config["z_channels"], config["quantized_embed_dim"], 1)
        self.quantize = VectorQuantizer(config["num_embeddings"], config["quantized_embed_dim"],
                                        config["commitment_cost"], config["l2_normalize_codes"])
        self.post_quant_conv = nn.Conv2d(config["quantized_embed_dim"], config["z_channels"], 1)

    def latents(self, pixels):
        """Continuous latents before quantization: quant_conv(encoder(pixels))."""
        return self.quant_conv(self.encoder(pixels))

    def decode_latents(self, zq):
        return self.decoder(self.post_quant_conv(zq))

    def forward(self, pixels):
        """Training pass: (reconstruction, codebook + commitment loss, codes)."""
        zq, vq_loss, codes = self.quantize(self.latents(pixels))
        return self.decode_latents(zq), vq_loss, codes

    def _batches(self, x, batch_size, pixels_per_image):
        device = next(self.parameters()).device
        # default: 16 images at 256x256
        batch_size = batch_size or max(1, 2 ** 20 // pixels_per_image)
        for i in range(0, x.shape[0], batch_size):
            yield x[i:i + batch_size].to(device)

    def _autocast(self, bf16):
        device = next(self.parameters()).device
        on = device.type == "cuda" if bf16 is None else bf16  # bf16 by default only on the GPU
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)

    @torch.no_grad()
    def encode(self, pixels, batch_size=None, bf16=None):
        """float [B, 3, H, W] in [0, 1] -> int64 codes [B, (H/f)*(W/f)] row-major, on the input's
        device, in batches on the model's device. bf16 autocast (default: on GPU) covers the
        convolutions; the nearest-code search always runs in fp32, so near-ties do not flip
        codes."""
        f = self.downsample_factor
        if (pixels.ndim != 4 or pixels.shape[1] != self.config["num_channels"]
                or not pixels.is_floating_point()):
            raise ValueError(f"encode expects float pixels [B, {self.config['num_channels']}, H, W]"
                             f" in [0, 1], got {pixels.dtype} {tuple(pixels.shape)} "
                             "(uint8 images: divide by 255)")
        if pixels.shape[2] % f or pixels.shape[3] % f:
            raise ValueError(f"image size {tuple(pixels.shape[2:])} must be a multiple of the "
                             f"downsample factor {f}")
        out = []
        for x in self._batches(pixels, batch_size, pixels.shape[2] * pixels.shape[3]):
            with self._autocast(bf16):
                z = self.latents(x.float())
            out.append(self.quantize.nearest(z).to(pixels.device))
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, codes, grid=None, batch_size=None, bf16=None):
        """int codes [B, h*w] -> float [B, 3, h*f, w*f] (not clamped: clamp to [0, 1] to write
        images). grid = (h, w) of the latent grid; default square."""
        n = codes.shape[1]
        h, w = grid or (math.isqrt(n), math.isqrt(n))
        if h * w != n:
            raise ValueError(f"{n} codes per image do not form a {h}x{w} grid; pass grid=(h, w)")
        if codes.min() < 0 or codes.max() >= self.config["num_embeddings"]:
            raise ValueError(f"codes must be in [0, {self.config['num_embeddings']}), got "
                             f"[{codes.min()}, {codes.max()}]")
        out = []
        for batch in self._batches(codes.long(), batch_size, n * self.downsample_factor ** 2):
            with self._autocast(bf16):
                x = self.decode_latents(self.quantize.lookup(batch, h, w))
            out.append(x.float().to(codes.device))
        return torch.cat(out)


# -----------------------------------------------------------------------------
# images <-> tokens, as the sequence model reads and writes them


def codes_per_image(vqgan):
    """Tokens of one image: (resolution / downsample factor)^2, e.g. 256 for LVM's at 256x256."""
    side = vqgan.config["resolution"] // vqgan.downsample_factor
    return side * side


def images_to_tokens(vqgan, images):
    """Images [N, 3, H, W], uint8 or float in [0, 1] -> VQ-GAN codes int64 [N, tokens_per_image]."""
    pixels = images.to(next(vqgan.parameters()).device)
    return vqgan.encode(pixels.float() / 255 if pixels.dtype == torch.uint8 else pixels.float())


def tokens_to_images(vqgan, tokens, tokens_per_image=None):
    """Codes [B, n * tokens_per_image] -> float images [B, n, 3, H, W] in [0, 1]."""
    S = tokens_per_image or codes_per_image(vqgan)
    B, L = tokens.shape
    if L % S:
        raise ValueError(f"{L} tokens are not a whole number of {S}-token images")
    device = next(vqgan.parameters()).device
    images = vqgan.decode(tokens.reshape(B * L // S, S).to(device)).clamp(0, 1)
    return images.view(B, L // S, *images.shape[1:])
