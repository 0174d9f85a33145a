"""
VQ-GAN image tokenizer: pixels in [0, 1] -> a grid of codebook indices -> pixels.

The network is open-muse's taming-style VQGANModel, the tokenizer released with LVM
(Emma02/vqvae_ckpts, the same network as openMUSE/vqgan-f16-8192-laion), with the same parameter
names, so its checkpoints load as they are.
  model = load_pretrained("path/to/vqvae_ckpts")  # directory with config.json +
                                                  #   pytorch_model.bin / safetensors
  codes = model.encode(pixels)                    # float [B, 3, H, W] in [0, 1] ->
                                                  #   int64 [B, (H/f)*(W/f)]
  recon = model.decode(codes)                     # -> float [B, 3, H, W], not clamped

Training from scratch on a folder of images (recursive), writing checkpoints that load_pretrained
reads:
  python vqgan.py --data data/toyworld/train --val_data data/toyworld/val --config toy \\
      --out_dir out/vqgan_toy
Any model config field can be overridden as --field=value (e.g. --num_embeddings=1024).
Measure a tokenizer (PSNR, codebook usage, palette-colour survival; encode speed): bench_vqgan.py.
"""
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from configs import parse_settings
from metrics import psnr
from model import learning_rate

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
    # a small f16 model (256x256 -> 16x16 codes, the paper's layout) for CPU experiments on real
    # photos
    "small-f16": dict(resolution=256, num_channels=3, hidden_channels=32,
                      channel_mult=[1, 1, 2, 2, 4], num_res_blocks=1, attn_resolutions=[],
                      no_attn_mid_block=True, z_channels=64, num_embeddings=1024,
                      quantized_embed_dim=16, dropout=0.0, resample_with_conv=True,
                      commitment_cost=0.25, norm_groups=8),
}
# our fields beyond open-muse's, with the released model's behaviour as default. GroupNorm needs
# several channels per group: with one, every channel is zero-mean per image and the decoder cannot
# output the image's mean colour.
EXTRA_FIELDS = dict(norm_groups=32, l2_normalize_codes=False, patch_encoder=False,
                    patch_decoder=False)
CONFIG_FILE, STATE_FILE = "config.json", "training_state.pt"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "diffusion_pytorch_model.safetensors",
                "diffusion_pytorch_model.bin")

# -----------------------------------------------------------------------------
# the network: open-muse's taming-style VQGANModel, parameter for parameter


def Normalize(channels, groups):
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, c):
        super().__init__()
        self.norm1, self.conv1 = (Normalize(cin, c["norm_groups"]),
                                  nn.Conv2d(cin, cout, 3, padding=1))
        self.norm2, self.conv2 = (Normalize(cout, c["norm_groups"]),
                                  nn.Conv2d(cout, cout, 3, padding=1))
        self.dropout = nn.Dropout(c["dropout"])
        if cin != cout:  # 1x1 projection so the residual matches the new width
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class Downsample(nn.Module):
    def __init__(self, channels, with_conv):
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        # asymmetric zero pad (right, bottom) then a stride-2 conv with no padding
        if hasattr(self, "conv"):
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    def __init__(self, channels, with_conv):
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


def _mid(channels, c):
    mid = nn.Module()
    mid.block_1, mid.block_2 = (ResnetBlock(channels, channels, c),
                                ResnetBlock(channels, channels, c))
    return mid


class Encoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        ch, mult, n = c["hidden_channels"], c["channel_mult"], len(c["channel_mult"])
        self.conv_in = nn.Conv2d(c["num_channels"], ch, 3, padding=1)
        self.down = nn.ModuleList()
        for i in range(n):  # level i works at resolution / 2**i with ch * mult[i] channels
            level, cin = nn.Module(), ch * ([1] + list(mult))[i]
            level.block = nn.ModuleList(
                [ResnetBlock(cin if j == 0 else ch * mult[i], ch * mult[i], c)
                 for j in range(c["num_res_blocks"])])
            if i < n - 1:
                level.downsample = Downsample(ch * mult[i], c["resample_with_conv"])
            self.down.append(level)
        self.mid = _mid(ch * mult[-1], c)
        self.norm_out = Normalize(ch * mult[-1], c["norm_groups"])
        self.conv_out = nn.Conv2d(ch * mult[-1], c["z_channels"], 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.block_1(h))
        return self.conv_out(F.silu(self.norm_out(h)))


class PatchEncoder(nn.Module):
    """Each f x f patch alone -> one latent, by a linear projection (a convolution with kernel =
    stride = f). A code then depends on its own patch only, so a flat colour has exactly one code.
    (The taming encoder's 3x3 convolutions and GroupNorm let a code depend on the patch's
    surroundings: synonym codes that the decoder renders alike but a sequence model must still
    predict.)"""

    def __init__(self, c):
        super().__init__()
        f = 2 ** (len(c["channel_mult"]) - 1)
        self.conv_in = nn.Conv2d(c["num_channels"], c["z_channels"], f, stride=f)

    def forward(self, x):
        return self.conv_in(x)


class PatchDecoder(nn.Module):
    """The mirror of PatchEncoder: a transposed convolution (kernel = stride = f) paints each code's
    patch."""

    def __init__(self, c):
        super().__init__()
        f = 2 ** (len(c["channel_mult"]) - 1)
        self.conv_out = nn.ConvTranspose2d(c["z_channels"], c["num_channels"], f, stride=f)

    def forward(self, z):
        return self.conv_out(z)


class Decoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        ch, mult, n = c["hidden_channels"], c["channel_mult"], len(c["channel_mult"])
        self.conv_in = nn.Conv2d(c["z_channels"], ch * mult[-1], 3, padding=1)
        self.mid = _mid(ch * mult[-1], c)
        self.up = nn.ModuleList()
        # up[i] is the level at resolution index i (up[n-1] is the lowest); run from n-1 down to 0
        for i in range(n):
            level, cin = nn.Module(), ch * mult[min(i + 1, n - 1)]
            level.block = nn.ModuleList(
                [ResnetBlock(cin if j == 0 else ch * mult[i], ch * mult[i], c)
                 for j in range(c["num_res_blocks"] + 1)])
            if i > 0:
                level.upsample = Upsample(ch * mult[i], c["resample_with_conv"])
            self.up.append(level)
        self.norm_out = Normalize(ch * mult[0], c["norm_groups"])
        self.conv_out = nn.Conv2d(ch * mult[0], c["num_channels"], 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
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
        c = {**CONFIGS["f16-8192"], **EXTRA_FIELDS,
             **{k: v for k, v in config.items() if not k.startswith("_")}}
        if c["attn_resolutions"] or not c["no_attn_mid_block"]:
            raise ValueError("this VQGAN has no attention blocks (the released LVM tokenizer "
                             "has none); set attn_resolutions=[] and no_attn_mid_block=true")
        if any((c["hidden_channels"] * m) % c["norm_groups"] for m in c["channel_mult"]):
            raise ValueError("hidden_channels * channel_mult must be multiples of norm_groups "
                             f"({c['norm_groups']})")
        self.config = c
        self.downsample_factor = 2 ** (len(c["channel_mult"]) - 1)
        self.encoder = (PatchEncoder if c["patch_encoder"] else Encoder)(c)
        self.decoder = (PatchDecoder if c["patch_decoder"] else Decoder)(c)
        self.quant_conv = nn.Conv2d(c["z_channels"], c["quantized_embed_dim"], 1)
        self.quantize = VectorQuantizer(c["num_embeddings"], c["quantized_embed_dim"],
                                        c["commitment_cost"], c["l2_normalize_codes"])
        self.post_quant_conv = nn.Conv2d(c["quantized_embed_dim"], c["z_channels"], 1)

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
        for c in self._batches(codes.long(), batch_size, n * self.downsample_factor ** 2):
            with self._autocast(bf16):
                x = self.decode_latents(self.quantize.lookup(c, h, w))
            out.append(x.float().to(codes.device))
        return torch.cat(out)


# -----------------------------------------------------------------------------
# checkpoints: open-muse layout (config.json + pytorch_model.bin or model.safetensors), diffusers
# aMUSEd VQModel


def _from_diffusers(sd, config):
    """Rename diffusers VQModel keys (and config fields) to open-muse ones (aMUSEd's VQModel is the
    same network)."""
    n = len(config["block_out_channels"])
    ch = config["block_out_channels"][0]
    muse = dict(num_channels=config.get("in_channels", 3), hidden_channels=ch,
                channel_mult=[b // ch for b in config["block_out_channels"]],
                num_res_blocks=config.get("layers_per_block", 2),
                z_channels=config["latent_channels"], num_embeddings=config["num_vq_embeddings"],
                quantized_embed_dim=config.get("vq_embed_dim") or config["latent_channels"],
                norm_groups=config.get("norm_num_groups", 32))
    rules = [(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block."),
             (r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
             (r"mid_block\.resnets\.0\.", "mid.block_1."),
             (r"mid_block\.resnets\.1\.", "mid.block_2."),
             (r"conv_shortcut", "nin_shortcut"), (r"conv_norm_out", "norm_out"),
             (r"upsamplers\.0\.", "upsample."), (r"\.resnets\.", ".block.")]
    out = {}
    for k, v in sd.items():
        # diffusers counts up blocks from the lowest resolution
        m = re.match(r"decoder\.up_blocks\.(\d+)\.(.*)", k)
        if m:
            k = f"decoder.up.{n - 1 - int(m.group(1))}.{m.group(2)}"
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out, muse


def save_pretrained(model, path):
    """Write config.json + model.safetensors in the open-muse layout that load_pretrained reads."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "VQGANModel", "_version": "0.0.1", **model.config}
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
              str(path / "model.safetensors"))


def _download(repo_id):
    hint = (f"download it by hand: on a machine with internet, `huggingface-cli download {repo_id} "
            "--local-dir DIR` (or fetch config.json and pytorch_model.bin from "
            f"https://huggingface.co/{repo_id}) and pass DIR")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{repo_id!r} is not a local directory and huggingface_hub is not "
                                f"installed; {hint}")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.bin", "*.safetensors"]))
    except Exception as e:
        raise FileNotFoundError(f"{repo_id!r} is not a local directory and could not be fetched "
                                f"from the Hugging Face hub ({type(e).__name__}); if it is a hub "
                                f"id, {hint}")


def load_pretrained(path, device=None):
    """A ready (eval-mode) VQGAN from a checkpoint directory or, where huggingface_hub is installed,
    a hub id. device: None picks the GPU when there is one."""
    path = Path(path)
    if not path.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) and not str(path).startswith("."):
            path = _download(str(path))
        else:
            raise FileNotFoundError(f"VQGAN checkpoint {str(path)!r} does not exist; pass a "
                                    f"directory holding config.json and {WEIGHT_FILES[0]} or "
                                    f"{WEIGHT_FILES[1]}, or a hub id such as Emma02/vqvae_ckpts")
    if (path.is_dir() and not (path / CONFIG_FILE).exists()
            and (path / "vqvae" / CONFIG_FILE).exists()):
        path = path / "vqvae"  # aMUSEd pipelines keep the tokenizer in a subfolder
    weights = [path / f for f in WEIGHT_FILES if (path / f).exists()]
    if not (path / CONFIG_FILE).exists() or not weights:
        raise FileNotFoundError(f"{str(path)!r} is not a VQGAN checkpoint: it needs config.json "
                                f"and one of {', '.join(WEIGHT_FILES)}")
    config = json.loads((path / CONFIG_FILE).read_text())
    if weights[0].suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(weights[0]))
    else:
        # never unpickle code from a checkpoint
        sd = torch.load(weights[0], map_location="cpu", weights_only=True)
    if "block_out_channels" in config:  # diffusers VQModel layout
        sd, config = _from_diffusers(sd, config)
    model = VQGAN(config)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match its config.json ({len(missing)} missing "
                         f"keys, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. "
                         f"{unexpected[:3]})")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()


# -----------------------------------------------------------------------------
# training pieces: data, discriminator, perceptual loss, codebook care, metrics

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}


def load_images(folder, resolution):
    """Every image under folder (recursive), centre-cropped square and resized, as uint8
    [N, 3, R, R] in memory."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist; pass a "
                                "directory of images")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) found under "
                                f"{str(folder)!r}")
    out = np.empty((len(paths), resolution, resolution, 3), dtype=np.uint8)
    n = 0
    for p in tqdm(paths, desc=f"loading {folder}", leave=False,
                  disable=len(paths) < 2000 or not sys.stderr.isatty()):
        try:
            im = Image.open(p).convert("RGB")
        except OSError as e:
            print(f"skipping unreadable image {p}: {e}", file=sys.stderr)
            continue
        s = min(im.size)
        im = im.crop(((im.width - s) // 2, (im.height - s) // 2, (im.width + s) // 2,
                      (im.height + s) // 2))
        out[n] = np.asarray(im if s == resolution
                            else im.resize((resolution, resolution), Image.BICUBIC))
        n += 1
    return torch.from_numpy(out[:n]).permute(0, 3, 1, 2).contiguous()


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix): a grid of real/fake logits, one per overlapping patch. No normalisation
    layers, so real and fake batches do not share statistics."""

    def __init__(self, n_layers=3, channels=64):
        super().__init__()
        layers, cin = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)], channels
        for i in range(1, n_layers + 1):
            cout = channels * min(2 ** i, 8)
            layers += [nn.Conv2d(cin, cout, 4, 2 if i < n_layers else 1, 1), nn.LeakyReLU(0.2)]
            cin = cout
        layers.append(nn.Conv2d(cin, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x * 2 - 1)


def hinge_d_loss(logits_real, logits_fake):
    # hinge GAN loss for the discriminator: E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]
    return F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean()


def adaptive_gan_weight(nll, g_loss, last_layer):
    # taming's adaptive weight: ||grad nll|| / ||grad gan|| at the decoder's last layer keeps the
    # GAN from dominating
    g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_nll.norm() / (g_gan.norm() + 1e-4)).clamp(0, 1e4).detach()


def load_lpips(device):
    """LPIPS(VGG) when the lpips package and the VGG16 weights are already on disk; None
    (and say so) otherwise."""
    vgg = Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth"
    try:
        import lpips
    except ImportError:
        print("perceptual loss: OFF (the lpips package is not installed)")
        return None
    if not vgg.exists():
        print(f"perceptual loss: OFF (VGG16 weights not found at {vgg}; nothing is downloaded "
              "at run time)")
        return None
    print("perceptual loss: ON (LPIPS, VGG16)")
    return lpips.LPIPS(net="vgg", verbose=False).to(device).eval().requires_grad_(False)


@torch.no_grad()
def pca_init_patch_codec(model, images, gen, n=32768):
    """Data-dependent init of a patch encoder and decoder: project each patch on its principal
    directions and paint it back from them (quant_conv and post_quant_conv start as identities), so
    the untrained codec already keeps what varies most; k-means then places the codes."""
    enc, dec, f = model.encoder.conv_in, model.decoder.conv_out, model.downsample_factor
    x = images[torch.randperm(len(images), generator=gen)
               [:max(1, n // (images.shape[2] // f) ** 2)]].float().div(255)
    channel_mean = x.mean((0, 2, 3))
    patches = (F.unfold(x - channel_mean[None, :, None, None], f, stride=f).transpose(1, 2)
               .reshape(-1, enc.weight[0].numel()))
    # rows beyond the patch's size stay zero
    directions = torch.zeros(enc.out_channels, patches.shape[1])
    # orthonormal rows
    principal = torch.linalg.svd(patches, full_matrices=False).Vh[:enc.out_channels]
    directions[:len(principal)] = principal
    enc.weight.copy_(directions.view_as(enc.weight))
    enc.bias.copy_(-directions.view(enc.out_channels, -1, f * f).sum(2) @ channel_mean)
    dec.weight.copy_(directions.view_as(dec.weight))
    dec.bias.copy_(channel_mean)
    for conv in (model.quant_conv, model.post_quant_conv):
        conv.weight.copy_(torch.eye(conv.out_channels, conv.in_channels).view_as(conv.weight))
        conv.bias.zero_()


def spread_picks(z, n, gen, centres=None):
    """n rows of z picked one by one with probability proportional to the squared distance from the
    nearest row picked so far (or of `centres`): k-means++ seeding. Unlike uniform picks, it never
    takes many copies of the commonest latent (a flat background): with a patch-local encoder, all
    its patches have one latent."""
    nearest = (torch.cdist(z, centres).min(1).values.pow(2) if centres is not None and len(centres)
               else None)
    picks = []
    for _ in range(n):
        if nearest is None or nearest.sum() <= 0:
            i = int(torch.randint(len(z), (1,), generator=gen))
        else:
            i = int(torch.multinomial(nearest.cpu(), 1, generator=gen))
        picks.append(i)
        d = (z - z[i]).pow(2).sum(1)
        nearest = d if nearest is None else torch.minimum(nearest, d)
    return z[picks].clone()


@torch.no_grad()
def kmeans_init_codebook(model, images, gen, iters=10):
    """Data-dependent init: k-means (k-means++ seeding) over encoder outputs, so every code starts
    where data is."""
    K, batch_size = model.config["num_embeddings"], min(64, max(1, 2 ** 20 // images[0].numel()))
    z = []
    while sum(t.shape[0] for t in z) < max(8 * K, 32768):
        x = images[torch.randint(len(images), (batch_size,), generator=gen)]
        lat = model.latents(x.float().div(255).to(next(model.parameters()).device))
        z.append(lat.permute(0, 2, 3, 1).reshape(-1, lat.shape[1]))
    z = torch.cat(z)
    z = F.normalize(z, dim=1) if model.quantize.l2_normalize else z
    centres = spread_picks(z, K, gen)
    for _ in range(iters):
        assign = torch.cdist(z, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, z)
        counts = torch.bincount(assign, minlength=K).unsqueeze(1)
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
    model.quantize.embedding.weight.data.copy_(centres)


@torch.no_grad()
def restart_dead_codes(model, usage, x, gen):
    """Dead-code restart: codes no training batch picked since the last check jump to current
    latents, picked far from the live codes (k-means++ style), so they go where the codebook is
    thin."""
    dead = (usage == 0).nonzero().squeeze(1)
    if len(dead):
        lat = model.latents(x)
        z = lat.permute(0, 2, 3, 1).reshape(-1, lat.shape[1])
        live = model.quantize.embedding.weight.data[usage > 0]
        model.quantize.embedding.weight.data[dead] = spread_picks(z, len(dead), gen, live)
    return len(dead)


def code_stats(codes, K):
    """(% of the codebook used, perplexity exp(H) of the code histogram)."""
    p = torch.bincount(codes.flatten(), minlength=K).double() / codes.numel()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return 100.0 * (p > 0).sum().item() / K, entropy.exp().item()


@torch.no_grad()
def evaluate(model, images, batch_size=None):
    """Round-trip images (uint8 [N, 3, R, R]) through encode/decode: PSNR, L1, codebook usage,
    perplexity."""
    was_training = model.training
    model.eval()
    x = images.float() / 255
    codes = model.encode(x, batch_size=batch_size)
    f = model.downsample_factor
    recon = model.decode(codes, grid=(x.shape[2] // f, x.shape[3] // f),
                         batch_size=batch_size).clamp(0, 1)
    model.train(was_training)
    usage, perplexity = code_stats(codes, model.config["num_embeddings"])
    return dict(psnr=psnr(recon, x).mean().item(), l1=(recon - x).abs().mean().item(), usage=usage,
                perplexity=perplexity), recon


# -----------------------------------------------------------------------------
# training


def train(args):
    """Train a VQ-GAN from scratch (or resume from args.out_dir). Returns the per-step loss
    history."""
    from sample import save_grid
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out_dir)
    if args.resume:
        if not (out / STATE_FILE).exists():
            raise FileNotFoundError(f"cannot resume: {out / STATE_FILE} does not exist; train "
                                    "without --resume first")
        model = load_pretrained(out, device=device).train()
        state = torch.load(out / STATE_FILE, map_location="cpu", weights_only=True)
    else:
        if args.config not in CONFIGS:
            raise ValueError(f"unknown config {args.config!r}; choose one of {', '.join(CONFIGS)}")
        torch.manual_seed(args.seed)
        model, state = VQGAN({**CONFIGS[args.config], **args.overrides}).to(device).train(), None
    R, K = model.config["resolution"], model.config["num_embeddings"]
    images = load_images(args.data, R)
    gen = torch.Generator().manual_seed(args.seed)
    if args.val_data:
        train_images, val_images = images, load_images(args.val_data, R)
    else:  # hold out a fixed random slice of the training folder
        n_val = max(1, int(len(images) * args.val_fraction))
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(1234))
        train_images, val_images = images[perm[n_val:]], images[perm[:n_val]]
    # shuffled once, so that each eval's --eval_images mixes every sub-folder
    val_images = val_images[torch.randperm(len(val_images),
                                           generator=torch.Generator().manual_seed(1234))]
    print(f"{len(train_images)} training and {len(val_images)} held-out images at {R}x{R}; "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; device {device}")

    disc = PatchDiscriminator(args.disc_layers, args.disc_channels).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(args.beta1, args.beta2))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(args.beta1, args.beta2))
    usage = torch.zeros(K, dtype=torch.long)
    step = 0
    if state is not None:
        disc.load_state_dict(state["disc"])
        opt.load_state_dict(state["opt"])
        opt_d.load_state_dict(state["opt_d"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        usage, step = state["usage"], int(state["step"])
        print(f"resumed from {out} at step {step}")
    elif args.kmeans_init:
        if model.config["patch_encoder"] and model.config["patch_decoder"]:
            pca_init_patch_codec(model, train_images, gen)
        kmeans_init_codebook(model, train_images, gen)
    lpips = load_lpips(device) if args.perceptual_weight > 0 else None
    print(f"discriminator starts at step {args.disc_start} (weight {args.disc_weight}, adaptive)")
    out.mkdir(parents=True, exist_ok=True)
    last_layer = model.decoder.conv_out.weight
    history, t0 = [], time.time()
    pbar = tqdm(range(step, args.max_steps), initial=step, total=args.max_steps, desc="vqgan",
                dynamic_ncols=True)
    for step in pbar:
        lr = learning_rate(step, args.lr, args.lr * args.min_lr_ratio, args.warmup_steps,
                           args.lr_decay_steps or args.max_steps)
        for o in (opt, opt_d):
            for g in o.param_groups:
                g["lr"] = lr
        x = (train_images[torch.randint(len(train_images), (args.batch_size,), generator=gen)]
             .float().div(255).to(device))
        recon, vq_loss, codes = model(x)
        rec = (recon - x).abs().mean() if args.rec_loss == "l1" else (recon - x).pow(2).mean()
        p_loss = (lpips(recon * 2 - 1, x * 2 - 1).mean() if lpips is not None
                  else torch.zeros((), device=device))
        nll = rec + args.perceptual_weight * p_loss
        loss = nll + vq_loss
        gan_on = step >= args.disc_start
        g_loss = d_loss = torch.zeros(())
        if gan_on:
            g_loss = -disc(recon).mean()  # hinge GAN loss for the generator: -E[D(G(z))]
            loss = loss + args.disc_weight * adaptive_gan_weight(nll, g_loss, last_layer) * g_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        if gan_on:
            d_loss = hinge_d_loss(disc(x), disc(recon.detach()))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        usage += torch.bincount(codes.flatten().cpu(), minlength=K)
        step += 1
        restarted = 0
        if args.restart_every and step % args.restart_every == 0:
            restarted = restart_dead_codes(model, usage, x, gen)
            usage.zero_()
        with torch.no_grad():
            train_psnr = psnr(recon.clamp(0, 1), x).mean().item()
        history.append(dict(step=step, rec=rec.item(), vq=vq_loss.item(), g=g_loss.item(),
                            d=d_loss.item(), perceptual=p_loss.item(), psnr=train_psnr,
                            restarted=restarted))
        pbar.set_postfix(rec=f"{rec.item():.4f}", psnr=f"{train_psnr:.1f}",
                         vq=f"{vq_loss.item():.4f}")
        out_of_time = args.time_limit > 0 and time.time() - t0 > 60 * args.time_limit
        if step % args.eval_interval == 0 or step == args.max_steps or out_of_time:
            metrics, val_recon = evaluate(model, val_images[:args.eval_images])
            metrics.update(step=step, lr=lr, minutes=(time.time() - t0) / 60, train_rec=rec.item())
            tqdm.write(f"step {step}: held-out PSNR {metrics['psnr']:.2f} dB, L1 "
                       f"{metrics['l1']:.4f}, codebook usage {metrics['usage']:.1f}%, perplexity "
                       f"{metrics['perplexity']:.1f}, {metrics['minutes']:.1f} min")
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            # truth, recon
            save_grid([list(val_images[:16]), list(val_recon[:16])], out / f"recon_{step:06d}.png")
            save_pretrained(model, out)
            torch.save(dict(disc=disc.state_dict(), opt=opt.state_dict(),
                            opt_d=opt_d.state_dict(), step=step, gen=gen.get_state(),
                            torch_rng=torch.get_rng_state(), usage=usage,
                            args={k: v for k, v in vars(args).items() if k != "overrides"}),
                       out / STATE_FILE)
        if out_of_time:
            tqdm.write(f"time limit of {args.time_limit} min reached at step {step}")
            break
    pbar.close()
    return history


# training settings, each a command-line flag --name: (default, help)
SETTINGS = dict(
    data=(None, "folder of images, searched recursively (required)"),
    val_data=(None, "held-out image folder (default: hold out --val_fraction of --data)"),
    val_fraction=(0.05, "share of --data held out when there is no --val_data"),
    config=("toy", f"model config: {', '.join(CONFIGS)}; override its fields as --field=value"),
    out_dir=("out/vqgan",
             "checkpoint directory: config.json, model.safetensors, training_state.pt, log, grids"),
    max_steps=(3000, "training steps"),
    time_limit=(0.0, "stop (and save) after this many minutes; 0 = no limit"),
    batch_size=(16, "images per step"),
    lr=(1e-3, "peak learning rate (Adam), for the model and the discriminator"),
    min_lr_ratio=(0.1, "cosine decay ends at lr * min_lr_ratio"),
    warmup_steps=(100, "linear warm-up steps"),
    lr_decay_steps=(0, "length of the cosine decay (0 = --max_steps)"),
    beta1=(0.9, "Adam beta1"), beta2=(0.95, "Adam beta2"),
    grad_clip=(1.0, "gradient-norm clip (0 = off)"),
    rec_loss=("l1", "reconstruction loss: l1 or l2"),
    perceptual_weight=(1.0, "LPIPS weight, used only when lpips and its VGG weights are on disk"),
    disc_start=(2000, "step at which the PatchGAN discriminator switches on"),
    disc_weight=(0.1, "GAN loss weight, times taming's adaptive weight"),
    disc_layers=(2, "PatchGAN stride-2 layers"), disc_channels=(32, "PatchGAN first-layer width"),
    kmeans_init=(1, "1: initialise the codebook by k-means on encoder outputs "
                    "(a patch codec: PCA first)"),
    restart_every=(100, "re-seed codes unused for this many steps from current latents (0 = off)"),
    eval_interval=(500, "steps between held-out evals, PNG grids and checkpoints"),
    eval_images=(512, "held-out images per eval"), seed=(0, "random seed"),
    device=(None, "cpu or cuda (default: cuda when available)"),
)


def parse_args(argv=None):
    """The settings above, --resume, and every model config field as --field=value (JSON for lists)
    over those of --config."""
    fields = {**CONFIGS["f16-8192"], **EXTRA_FIELDS}
    table = {**SETTINGS, "resume": (False, "continue exactly from the checkpoint in --out_dir"),
             **{k: (None, "model config field (default: that of --config)", type(v))
                for k, v in fields.items()}}
    args = parse_settings(table, argv,
                          "Train a VQ-GAN image tokenizer from scratch on a folder of images.")
    if not args.data:
        sys.exit("vqgan.py: error: --data is required: a folder of training images")
    if args.rec_loss not in ("l1", "l2"):
        sys.exit(f"vqgan.py: error: --rec_loss must be l1 or l2, not {args.rec_loss!r}")
    args.overrides = {k: getattr(args, k) for k in fields if getattr(args, k) is not None}
    return args


if __name__ == "__main__":
    args = parse_args()
    try:
        train(args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
