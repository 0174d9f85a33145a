"""
The feature networks behind FID, IS and FVD (evaluate.py's protocols): callables from uint8 images
[N, 3, H, W] (or clips [N, 3, T, H, W]) to (features [N, D], logits [N, C] or None), each with a
`name`. Any such object plugs into the protocols.

- standard: the paper's networks, read from local files (nothing is downloaded at run time):
  Inception-v3 of the ADM evaluator (torch-fidelity) for FID / IS, StyleGAN-V's I3D TorchScript for
  FVD.
- tiny: a fixed random conv net; it ranks runs against each other offline, but its numbers are not
  comparable with the paper's.
"""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 + INCEPTION_FILE)
I3D_FILE = "i3d_torchscript.pt"
I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"


def _weights_path(path, filename, url, flag):
    """A local weights file: the given path, else the torch hub cache where downloaders put it."""
    path = Path(path) if path else Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not path.is_file():
        raise FileNotFoundError(f"{filename} not found at {path}: fetch {url} on a machine with "
                                f"internet and put it there, or pass {flag} PATH (--features tiny "
                                "runs offline, not comparable with the paper)")
    return path


class TinyExtractor(nn.Module):
    """A fixed random conv net (seeded): features for tests and toy-world runs, images or
    (video=True) clips."""

    def __init__(self, video=False, dim=64, num_classes=16, seed=0):
        super().__init__()
        self.name = f"tiny random {'3D ' if video else ''}conv net (not comparable with the paper)"
        self.video = video
        Conv = nn.Conv3d if video else nn.Conv2d
        with torch.random.fork_rng(devices=[]):  # same weights every run, global RNG untouched
            torch.manual_seed(seed)
            self.net = nn.Sequential(Conv(3, 16, 3, 2, 1), nn.ReLU(),
                                     Conv(16, 32, 3, 2, 1), nn.ReLU(),
                                     Conv(32, dim, 3, 2, 1), nn.ReLU())
            self.head = nn.Linear(dim, num_classes)
            # He init keeps activations (and so the distances) at a readable scale
            for m in self.modules():
                if isinstance(m, (Conv, nn.Linear)):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    nn.init.zeros_(m.bias)
            self.head.weight.data.mul_(10)  # spread the logits, so that IS is not pinned at 1
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, x):
        size = (x.shape[2], 32, 32) if self.video else (32, 32)
        x = F.interpolate(x.to(self.head.weight.device).float() / 127.5 - 1, size=size, mode="area")
        feats = self.net(x).flatten(2).mean(2)
        return feats, self.head(feats)


class InceptionExtractor:
    """Inception-v3 of the ADM/TF evaluator via torch-fidelity: pool3 features (2048) for FID,
    logits for IS."""
    name = "Inception-v3 (torch-fidelity, ADM compatible)"

    def __init__(self, weights=None, device="cpu"):
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise ImportError("FID/IS with --features standard need torch-fidelity: pip install "
                              "torch-fidelity (or use --features tiny for runs not comparable with "
                              "the paper)") from None
        path = _weights_path(weights, INCEPTION_FILE, INCEPTION_URL, "--inception_weights")
        self.device = device
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(path)).to(device)

    @torch.no_grad()
    def __call__(self, images):  # uint8 [N, 3, H, W], resized to 299 inside as the TF original does
        return self.net(images.to(self.device))


class I3DExtractor:
    """I3D (Kinetics-400) from StyleGAN-V's TorchScript file: the FVD features."""
    name = "I3D (StyleGAN-V TorchScript)"

    def __init__(self, path=None, device="cpu"):
        path = _weights_path(path, I3D_FILE, I3D_URL, "--i3d_weights")
        self.device = device
        self.net = torch.jit.load(str(path), map_location=device).eval()

    # uint8 [N, 3, T, H, W]; the script rescales to [-1, 1] and resizes to 224
    @torch.no_grad()
    def __call__(self, videos):
        return self.net(videos.to(self.device), rescale=True, resize=True,
                        return_features=True).float(), None


def make_extractor(kind="standard", video=False, device="cpu", weights=None):
    """The feature network of --features tiny | standard, for images (FID, IS) or clips
    (video=True, FVD)."""
    if kind == "tiny":
        return TinyExtractor(video=video).to(device)
    if kind == "standard":
        return I3DExtractor(weights, device) if video else InceptionExtractor(weights, device)
    raise ValueError(f"unknown feature extractor {kind!r}: use 'standard' or 'tiny'")
