"""
Training a VQ-GAN tokenizer from scratch on a folder of images (vqgan.py holds the network it
trains): L1 or L2 reconstruction + LPIPS (when its weights are on disk) + the VQ codebook and
commitment terms + a PatchGAN hinge loss with taming's adaptive weight, and the usual cures for
codebook collapse (data-dependent initialisation, dead-code restarts). Writes checkpoints that
infra/vqgan_checkpoint.py reads, and resumes exactly.

    python tools/vqgan_train.py --data data/toyworld/train --val_data data/toyworld/val \\
        --config toy --out_dir out/vqgan_toy
Any model config field can be overridden as --field=value (e.g. --num_embeddings=1024).
Measure a tokenizer (PSNR, codebook usage, palette-colour survival; encode speed): bench/vqgan.py.
"""
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

if __package__ in (None, ""):  # run as `python tools/vqgan_train.py`: import from the repository
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from infra.settings import parse_settings
from infra.images import load_images, save_grid
from metrics import psnr
from train import learning_rate
from vqgan import CONFIGS, EXTRA_FIELDS, VQGAN
from infra.vqgan_checkpoint import load_pretrained, save_pretrained

STATE_FILE = "training_state.pt"  # discriminator, optimizers, RNG, step: what resuming needs

# -----------------------------------------------------------------------------
# training pieces: discriminator, perceptual loss, codebook care, metrics


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
        sys.exit("vqgan_train.py: error: --data is required: a folder of training images")
    if args.rec_loss not in ("l1", "l2"):
        sys.exit(f"vqgan_train.py: error: --rec_loss must be l1 or l2, not {args.rec_loss!r}")
    args.overrides = {k: getattr(args, k) for k in fields if getattr(args, k) is not None}
    return args


if __name__ == "__main__":
    args = parse_args()
    try:
        train(args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
