"""
The VQ-GAN checkpoint formats vqgan.py's network is read from and written to: open-muse's layout
(config.json + pytorch_model.bin or model.safetensors: LVM's released tokenizer,
Emma02/vqvae_ckpts, and what tools/vqgan_train.py writes) and diffusers' aMUSEd VQModel (the same
network under other names). A Hugging Face hub id is downloaded where huggingface_hub is installed.

    tokenizer = load_pretrained("path/to/vqvae_ckpts")   # a ready, eval-mode vqgan.VQGAN
    save_pretrained(tokenizer, "out/vqgan")
"""
import json
import re
from pathlib import Path

import torch

from vqgan import VQGAN

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "diffusion_pytorch_model.safetensors",
                "diffusion_pytorch_model.bin")




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
