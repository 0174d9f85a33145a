"""Evaluation: the metrics (metrics.py) against independent computations and hand-built answers, the feature
extractors offline, and every protocol end to end on the toy world and on tiny folders in the ADE20K, Cityscapes
and UCF-101 layouts."""
import dataclasses
import functools
import json
import math
import shutil
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

import evaluate
from toy import toyworld
import vqgan
from infra import vqgan_checkpoint
from data import discriminative_sequence, generative_sequence, load_tokens, natural_sequence
from infra import features
from evaluate import (EvalConfig, eval_generation, eval_perplexity, eval_segmentation, eval_video, find_paired,
                      find_videos, read_pair)
from infra.features import I3DExtractor, InceptionExtractor, TinyExtractor
from metrics import colors_to_classes, frechet_distance, inception_score, labels_from_colours, mean_iou, psnr, ssim
from model import ModelArgs, Transformer
from infra.images import PALETTES
from vqgan import codes_per_image, images_to_tokens, tokens_to_images

TINY = dict(dim=32, n_layers=1, n_heads=2, hidden_dim=64, vocab_size=512, max_seq_len=1024)
FAST = dict(limit=2, batch_size=2, clip_frames=6, prompt_frames=4)  # short clips keep sampling quick on a CPU


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def lvm():
    torch.manual_seed(0)
    return Transformer(ModelArgs(**TINY)).eval()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy") / "toyworld"
    toyworld.generate(root, seed=0, num_images=3, num_val_images=5, num_videos=1, num_val_videos=3, frames=16)
    return root


def keep_only(world, folders):
    """Remove the pictures no test of a world reads, so that a tokenizer need tell apart only the others."""
    for folder in world.glob("*/*"):
        if folder.is_dir() and folder.name not in folders:
            shutil.rmtree(folder)
    return world


@pytest.fixture(scope="module")
def curve_world(tmp_path_factory):
    """Enough training pictures for 7 prompt pairs; segmentation only."""
    root = tmp_path_factory.mktemp("curve") / "world"
    toyworld.generate(root, seed=0, num_images=8, num_val_images=3, num_videos=0, num_val_videos=0)
    return keep_only(root, {"images", "segmentation"})


@pytest.fixture(scope="module")
def mapping_world(tmp_path_factory):
    """Two groups of 8 held-out pictures, each group's maps recoloured with a palette of its own."""
    root = tmp_path_factory.mktemp("mapping") / "world"
    toyworld.generate(root, seed=0, num_images=0, num_val_images=16, num_videos=0, num_val_videos=0)
    return keep_only(root, {"images", "segmentation", "recoloured"})


@pytest.fixture(scope="module")
def tokenizer(toy, curve_world, mapping_world):
    """A random toy VQ-GAN that gives every picture of the test worlds tokens of its own (pictures with the same
    pixels aside), so that a test can name the pictures a prompt shows, in order. An untrained one merges a few
    (seed 0: a grey picture and its colour original), so seeds are tried in turn."""
    distinct = {im.numpy().tobytes(): im for world in (toy, curve_world, mapping_world)
                for im in pictures(world).values()}
    for seed in range(1000):
        torch.manual_seed(seed)
        vq = vqgan.VQGAN(vqgan.CONFIGS["toy"]).eval()
        if len(set(map(tuple, encode(vq, distinct.values()).tolist()))) == len(distinct):
            return vq
    raise AssertionError("no seed below 1000 gives a toy VQ-GAN that tells the test worlds' pictures apart")


def random_cov(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d


# ----------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_distance_matches_scipy_sqrtm(seed):
    rng = np.random.default_rng(seed)
    mu1, mu2, s1, s2 = rng.normal(size=16), rng.normal(size=16), random_cov(rng, 16), random_cov(rng, 16)
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, abs=1e-3)
    as_tensors = frechet_distance(*map(torch.from_numpy, (mu1, s1, mu2, s2)))
    assert isinstance(as_tensors, float) and as_tensors == pytest.approx(reference, abs=1e-3)


def test_frechet_distance_is_zero_for_identical_statistics():
    rng = np.random.default_rng(0)
    mu, s = rng.normal(size=32), random_cov(rng, 32)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0, abs=1e-6)


def test_frechet_distance_stays_finite_for_singular_covariances():
    rng = np.random.default_rng(0)
    d = frechet_distance(np.zeros(16), random_cov(rng, 16, rank=2), np.ones(16), random_cov(rng, 16, rank=3))
    assert math.isfinite(d) and d > 0
    # orthogonal rank-1 covariances: sqrt(S1 S2) = 0, so the distance is Tr S1 + Tr S2
    assert frechet_distance([0, 0], np.diag([1.0, 0]), [0, 0], np.diag([0, 4.0])) == pytest.approx(5.0)
    assert frechet_distance(np.zeros(4), np.zeros((4, 4)), np.zeros(4), np.zeros((4, 4))) == 0


def test_inception_score_of_known_predictions():
    confident = torch.eye(8).repeat(4, 1) * 100  # every class equally often, each prediction certain: IS = 8
    assert inception_score(confident, splits=1)[0] == pytest.approx(8, rel=1e-6)
    assert inception_score(torch.zeros(32, 8), splits=4)[0] == pytest.approx(1)  # no information: IS = 1


def test_psnr_and_ssim_of_known_pairs():
    x = torch.rand(3, 3, 32, 32) * 0.8
    assert torch.allclose(psnr(x, x + 0.1), torch.full((3,), 20.0), atol=1e-4)  # MSE 0.01 -> 20 dB
    assert torch.allclose(ssim(x, x), torch.ones(3))
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    assert (ssim(x, noisy) < 0.9).all() and (ssim(x, noisy) > ssim(x, torch.rand_like(x))).all()


@pytest.mark.inference
def test_colors_to_classes_picks_the_nearest_palette_colour():
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 0, 255]], np.uint8)
    rgb = torch.tensor([[[[10, 5, 0], [200, 30, 20]], [[20, 10, 240], [255, 0, 0]]]], dtype=torch.uint8)  # [1,2,2,3]
    out = colors_to_classes(rgb, palette)
    assert out.dtype == torch.int64 and out.shape == (1, 2, 2)
    assert out.tolist() == [[[0, 1], [2, 1]]]
    assert colors_to_classes(np.array([[128, 0, 128]], np.uint8), palette).tolist() == [1]  # tie: first colour


@pytest.mark.inference
def test_colors_to_classes_measures_colour_distance_as_euclidean_rgb():
    """Pixels where the Euclidean nearest colour is not the nearest by other distances (sum or largest of the
    channel differences): the read-out is the Euclidean one, as the paper's nearest-colour decoding."""
    palette = np.array([[0, 0, 0], [30, 30, 30], [0, 0, 100]], np.uint8)
    rgb = np.array([[60, 0, 0],  # Euclidean -> 1; by the sum of the differences -> 0
                    [0, 0, 52],  # Euclidean -> 1; by the sum -> 2
                    [45, 0, 0]], np.uint8)  # Euclidean -> 0; by the largest difference -> 1
    assert colors_to_classes(rgb, palette).tolist() == [1, 1, 0]


@pytest.mark.inference
def test_mean_iou_of_a_hand_built_map():
    gt = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 2, 2]])
    # class 0: TP 3, 4 true, 3 predicted -> 3/4; class 1: TP 2, 3 true, 3 predicted -> 2/4;
    # class 2 is not in the ground truth, so it is not averaged; the ignored pixel counts for nothing
    assert mean_iou(pred, gt, num_classes=3) == pytest.approx(0.625)
    assert mean_iou(torch.where(gt == 255, 0, pred), gt, 3) == pytest.approx(0.625)
    assert mean_iou(gt.clamp(max=1), gt, 3) == pytest.approx(1.0)
    assert mean_iou(torch.full_like(gt, 7), gt, 3) == 0.0  # predictions outside the classes are misses
    assert mean_iou(torch.tensor([7, 7]), torch.tensor([2, 2]), 3) == 0.0  # ... of every class, the last too
    assert math.isnan(mean_iou(pred, torch.full_like(gt, 255), 3))


@pytest.mark.inference
def test_mean_iou_uses_the_ignore_index_given():
    gt, pred = torch.tensor([0, 1, 9]), torch.tensor([0, 1, 0])
    assert mean_iou(pred, gt, 10, ignore_index=9) == 1.0
    # not ignored, class 9 is a miss: IoUs 1/2 (class 0), 1 (class 1), 0 (class 9)
    assert mean_iou(pred, gt, 10, ignore_index=255) == pytest.approx(0.5)


@pytest.mark.inference
def test_ground_truth_colours_read_back_as_classes_with_unlabelled_pixels_ignored():
    palette = PALETTES["ade20k"]
    colours = torch.from_numpy(np.stack([palette[3], palette[149], [0, 0, 0], [1, 2, 3]]).astype(np.uint8))
    assert labels_from_colours(colours, palette).tolist() == [3, 149, 255, 255]


# ----------------------------------------------------------------------------- feature extractors


def test_tiny_extractor_is_fixed_and_sees_images_and_clips():
    images = torch.randint(0, 256, (4, 3, 48, 48), dtype=torch.uint8)
    f1, logits = TinyExtractor()(images)
    f2, _ = TinyExtractor()(images)
    assert f1.shape == (4, 64) and logits.shape == (4, 16) and torch.equal(f1, f2)
    feats, _ = TinyExtractor(video=True)(torch.randint(0, 256, (2, 3, 16, 32, 32), dtype=torch.uint8))
    assert feats.shape == (2, 64)
    assert "not comparable" in TinyExtractor().name


class FakeI3D(torch.nn.Module):
    def forward(self, x, rescale: bool = False, resize: bool = False, return_features: bool = False):
        x = x.float() / 127.5 - 1 if rescale else x.float()
        return torch.cat([x.mean((2, 3, 4)), x.std((2, 3, 4))], 1)


def test_i3d_extractor_runs_a_torchscript_file(tmp_path):
    torch.jit.script(FakeI3D()).save(str(tmp_path / "i3d_torchscript.pt"))
    videos = torch.randint(0, 256, (3, 3, 16, 8, 8), dtype=torch.uint8)
    feats, logits = I3DExtractor(tmp_path / "i3d_torchscript.pt")(videos)
    assert feats.shape == (3, 6) and logits is None
    assert torch.allclose(feats[:, :3], videos.float().mean((2, 3, 4)) / 127.5 - 1, atol=1e-5)


def test_missing_weights_name_the_file_to_fetch(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="i3d_torchscript.pt"):
        I3DExtractor(tmp_path / "i3d_torchscript.pt")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # empty cache: nothing downloaded
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth"):
        features._weights_path(None, features.INCEPTION_FILE, features.INCEPTION_URL, "--inception_weights")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        InceptionExtractor()


# ----------------------------------------------------------------------------- dataset layouts


def make_ade20k(root, n=3, size=32):
    rng = np.random.default_rng(0)
    for split in ("validation",):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                root / "images" / split / f"ADE_val_{i:08d}.jpg")
            labels = np.kron(rng.integers(0, 151, (4, 4)), np.ones((size // 4, size // 4))).astype(np.uint8)
            Image.fromarray(labels).save(root / "annotations" / split / f"ADE_val_{i:08d}.png")
    return root


def make_cityscapes(root, n=3, size=32):
    rng = np.random.default_rng(1)
    for i in range(n):
        city = ["frankfurt", "lindau"][i % 2]
        (root / "leftImg8bit" / "val" / city).mkdir(parents=True, exist_ok=True)
        (root / "gtFine" / "val" / city).mkdir(parents=True, exist_ok=True)
        stem = f"{city}_000000_{i:06d}"
        Image.fromarray(rng.integers(0, 256, (size, 2 * size, 3), dtype=np.uint8)).save(
            root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png")
        ids = rng.choice(np.r_[0:19, 255], (4, 8)).astype(np.uint8)
        Image.fromarray(np.kron(ids, np.ones((size // 4, size // 4), np.uint8))).save(
            root / "gtFine" / "val" / city / f"{stem}_gtFine_labelTrainIds.png")
    return root


def make_ucf101(root, frames=10, size=40):
    """One class with a .avi and a frame folder, one class with a video too short for a clip."""
    rng = np.random.default_rng(2)
    folder = root / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g01_c02"
    folder.mkdir(parents=True)
    for t in range(frames):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{t:04d}.jpg")
    (root / "Archery").mkdir()
    for name, n in (("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", frames), ("Archery/v_Archery_g01_c01.avi", 3)):
        with av.open(str(root / name), "w") as container:
            stream = container.add_stream("mpeg4", rate=25)
            stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
            for t in range(n):
                frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), 20 * t, np.uint8), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
    return root


@pytest.mark.inference
def test_ade20k_labels_shift_by_one_with_zero_ignored(tmp_path):
    ds = find_paired(make_ade20k(tmp_path / "ADEChallengeData2016"), "val")
    assert ds.name == "ade20k" and len(ds.units) == 3 and len(ds.palette) == 150
    image, colours, labels = read_pair(ds, ds.units[0], 32)
    raw = torch.from_numpy(np.array(Image.open(ds.units[0][2]))).long()
    assert torch.equal(labels, torch.where(raw == 0, 255, raw - 1))
    assert image.shape == colours.shape == (3, 32, 32) and image.dtype == torch.uint8


@pytest.mark.inference
def test_cityscapes_train_ids_read_back_exactly(tmp_path):
    ds = find_paired(make_cityscapes(tmp_path), "val")
    assert ds.name == "cityscapes" and len(ds.units) == 3
    _, _, labels = read_pair(ds, ds.units[0], 32)
    raw = np.asarray(Image.open(ds.units[0][2]))[:, 16:48]  # the centre crop of a 2:1 frame
    assert torch.equal(labels, torch.from_numpy(raw.astype(np.int64)))


def test_unknown_layout_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="ADE20K"):
        find_paired(tmp_path)
    with pytest.raises(FileNotFoundError, match="no videos"):
        find_videos(tmp_path)
    with pytest.raises(FileNotFoundError, match="image dataset"):  # its image folders are not videos
        find_videos(make_ade20k(tmp_path / "ADEChallengeData2016"))


# ----------------------------------------------------------------------------- reading back what reaches the model
# The tests below name the pictures a prompt shows: every picture of a test world is encoded with the test tokenizer
# (which gives each its own tokens), so a prompt's tokens read back as "val/images/00003", "val/segmentation/00003",
# ... and can be compared with the layout the paper prescribes. Stand-ins for the model answer with chosen pictures.

VAL = [f"{i:05d}" for i in range(5)]  # the toy fixture's held-out pictures


@functools.cache
def pictures(world):
    """{name: uint8 [3, 32, 32]} of every picture of a toy world, read with PIL rather than the code under test and
    named by its path without the suffix: "val/images/00003", "val/videos/0001/04"."""
    return {str(p.relative_to(world).with_suffix("")): torch.from_numpy(np.array(Image.open(p).convert("RGB")))
            .permute(2, 0, 1) for p in sorted(Path(world).rglob("*.png"))}


def encode(tokenizer, images):
    with torch.no_grad():
        return images_to_tokens(tokenizer, torch.stack(list(images)))


def round_trip(tokenizer, images):
    """The pictures through the tokenizer and back, as uint8."""
    with torch.no_grad():
        decoded = tokens_to_images(tokenizer, encode(tokenizer, images)).flatten(0, 1)
    return (decoded.clamp(0, 1) * 255).round().to(torch.uint8)


def namer(tokenizer, world):
    """tokens [n * S] -> the names of the n pictures they show ("?": none); of pictures with the same pixels (a
    video's frames repeat), the first by name."""
    table = {}
    for name, tokens in zip(pictures(world), encode(tokenizer, pictures(world).values()).tolist()):
        table.setdefault(tuple(tokens), name)
    S = codes_per_image(tokenizer)
    return lambda tokens: [table.get(tuple(image), "?") for image in tokens.reshape(-1, S).tolist()]


def renamed(name, folder):
    """The picture of the same split and stem in another folder: renamed("val/images/00003", "edges")."""
    split, _, stem = name.split("/")
    return f"{split}/{folder}/{stem}"


def model_answering(monkeypatch, tokenizer, world, answer=None, echo=lambda prompt: prompt):
    """Record what reaches the model's sampling (evaluate.generate): per call, per prompt row, the names of the
    pictures the row shows. answer: a stand-in for the model, continuing a row by the tokens of the pictures
    answer(names of the row's pictures, number of images asked for) names, with echo(prompt) in place of the prompt;
    None: the model samples."""
    name, asked, S, sample = namer(tokenizer, world), [], codes_per_image(tokenizer), evaluate.generate

    def generate(model, prompt, max_new_tokens, *args, **kwargs):
        rows = [name(row) for row in prompt.cpu()]
        asked.append(rows)
        if answer is None:
            return sample(model, prompt, max_new_tokens, *args, **kwargs)
        new = torch.stack([encode(tokenizer, [pictures(world)[a] for a in answer(row, max_new_tokens // S)]).view(-1)
                           for row in rows])
        assert new.shape[1] == max_new_tokens
        return torch.cat([echo(prompt), new.to(prompt.device)], 1)

    monkeypatch.setattr(evaluate, "generate", generate)
    return asked


def model_painting(monkeypatch, tokenizer, world, paint):
    """Stand in for sampling and decoding both (evaluate._sample): a prompt row is answered with the pixels
    paint(names of the row's pictures, number of images asked for) [n, 3, R, R] uint8: pixels no model could give
    exactly through the tokenizer, as those of the baselines computed on true pixels."""
    name = namer(tokenizer, world)

    def _sample(model, vq, prompt, n_images, cfg, generator):
        images = torch.stack([paint(name(row), n_images) for row in prompt.cpu()])
        return images, encode(vq, images.flatten(0, 1)).view(len(images), -1)

    monkeypatch.setattr(evaluate, "_sample", _sample)


def rows(asked):
    """The rows of every call, in order: one per query."""
    return [row for call in asked for row in call]


def true_map(names, n):  # the query's true segmentation map
    return [renamed(names[-1], "segmentation")]


def true_image(names, n):  # the picture of the query's annotation
    return [renamed(names[-1], "images")]


def classes(maps):
    """Class indices [N, R, R] of toy segmentation maps: each pixel's palette colour, matched exactly."""
    palette = torch.from_numpy(PALETTES["toy"]).long()
    hit = (torch.stack(maps).permute(0, 2, 3, 1)[..., None, :].long() == palette).all(-1)  # [N, R, R, K]
    assert hit.any(-1).all()
    return hit.long().argmax(-1)


def clip(world, video, frames):
    """uint8 [frames, 3, R, R]: the first frames of a toy world's held-out video."""
    return torch.stack([pictures(world)[f"val/videos/{video:04d}/{t:02d}"] for t in range(frames)])


def others(prompt_path, n=4):
    """The held-out pictures asked after a prompt drawn from the held-out split: all but the prompt's, in order."""
    return [s for s in VAL if s != Path(prompt_path).stem][:n]


# ----------------------------------------------------------------------------- protocols, end to end


@pytest.mark.decoder
@pytest.mark.tokenizer
@pytest.mark.inference
def test_video_protocol_on_the_toy_world(lvm, tokenizer, toy, tmp_path):
    r = eval_video(lvm, tokenizer, toy, EvalConfig(limit=2, batch_size=2, out=str(tmp_path)))  # 16 frames, 5 prompt
    assert r["queries"] == 2 and r["skipped"] == 0
    assert len(r["model"]["psnr_per_frame"]) == 11
    for row in ("model", "gt_rec"):
        assert all(math.isfinite(r[row][k]) for k in ("fvd", "psnr", "ssim"))
    assert r["dataset"] == "toy" and (tmp_path / "video_toy.png").is_file()


@pytest.mark.decoder
@pytest.mark.tokenizer
@pytest.mark.inference
def test_video_prompt_is_the_clips_first_frames_in_time_order(lvm, tokenizer, toy, monkeypatch):
    asked = model_answering(monkeypatch, tokenizer, toy)
    eval_video(lvm, tokenizer, toy, EvalConfig(**FAST))  # clips of 6 frames, 4 of them the prompt
    assert asked == [[[f"val/videos/{v:04d}/{t:02d}" for t in range(4)] for v in (0, 1)]]


@pytest.mark.decoder
@pytest.mark.tokenizer
def test_video_oracle_of_the_true_frames_tokens_scores_the_round_trip_row(lvm, tokenizer, toy, monkeypatch):
    """A model that continues each clip with the tokens of its true next frames scores the "Ground truth rec." row
    exactly, even though its echo of the prompt is wrong: only the new tokens are read, only the new frames scored
    (the round-trip row is the PSNR of frames 4 and 5 alone), and the clip scored is the decoded prompt frames then
    the new ones, in time order."""
    def future(names, n):
        video = names[-1].rsplit("/", 1)[0]
        return [f"{video}/{t:02d}" for t in range(4, 4 + n)]

    model_answering(monkeypatch, tokenizer, toy, future, echo=lambda prompt: (prompt + 1) % 512)
    r = eval_video(lvm, tokenizer, toy, EvalConfig(**FAST))
    assert {k: r["model"][k] for k in r["gt_rec"]} == pytest.approx(r["gt_rec"], rel=1e-6)  # FVD, PSNR, SSIM
    assert r["model"]["copyable_right_per_frame"] == [100.0, 100.0]
    truth = torch.cat([clip(toy, v, 6)[4:] for v in (0, 1)])
    expected = psnr(round_trip(tokenizer, truth).float() / 255, truth.float() / 255).mean().item()
    assert r["gt_rec"]["psnr"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.decoder
@pytest.mark.tokenizer
def test_video_repeat_last_row_holds_the_last_prompt_frame(lvm, tokenizer, toy, monkeypatch):
    """The naive forecast, nothing moves after the prompt, scored on the predicted frames only; a model that answers
    with the last prompt frame's true pixels scores exactly that row."""
    model_painting(monkeypatch, tokenizer, toy,
                   lambda names, n: pictures(toy)[names[-1]][None].expand(n, -1, -1, -1))
    r = eval_video(lvm, tokenizer, toy, EvalConfig(**FAST))
    assert r["model"]["psnr"] == r["repeat_last"]["psnr"] and r["model"]["ssim"] == r["repeat_last"]["ssim"]
    clips = torch.stack([clip(toy, v, 6) for v in (0, 1)]).float() / 255
    per_frame = [psnr(clips[:, 3], clips[:, t]).mean().item() for t in (4, 5)]  # mean over the clips
    assert r["repeat_last"]["psnr_per_frame"] == pytest.approx(per_frame, rel=1e-5)


@pytest.mark.decoder
@pytest.mark.tokenizer
@pytest.mark.inference
def test_video_protocol_on_ucf101_files_and_frame_folders(lvm, tokenizer, tmp_path):
    r = eval_video(lvm, tokenizer, make_ucf101(tmp_path / "UCF-101"), EvalConfig(**{**FAST, "limit": None}))
    assert r["queries"] == 2 and r["skipped"] == 1  # the 3-frame video cannot give a 6-frame clip
    assert math.isfinite(r["model"]["fvd"])


@pytest.mark.decoder
@pytest.mark.tokenizer
@pytest.mark.inference
@pytest.mark.parametrize("annotation", ["segmentation", "edges", "depth"])
def test_generation_protocol_on_the_toy_world(lvm, tokenizer, toy, annotation):
    prompt_split = "train" if annotation == "depth" else None  # default: a prompt from the evaluated split
    r = eval_generation(lvm, tokenizer, toy, EvalConfig(**FAST, annotation=annotation, prompt_split=prompt_split))
    assert r["queries"] == 2 and r["condition"] == annotation
    assert all(math.isfinite(r[row][k]) and r[row][k] >= 0 for row in ("model", "gt_rec") for k in ("fid", "is"))
    assert f"/{prompt_split or 'val'}/images/" in r["prompt"]


@pytest.mark.decoder
@pytest.mark.tokenizer
@pytest.mark.inference
@pytest.mark.parametrize("annotation", ["segmentation", "edges", "depth"])
def test_generation_prompt_is_annotation_then_image_then_the_query_annotation(lvm, tokenizer, toy, monkeypatch,
                                                                               annotation):
    asked = model_answering(monkeypatch, tokenizer, toy)
    r = eval_generation(lvm, tokenizer, toy, EvalConfig(limit=4, batch_size=3, annotation=annotation))
    p = Path(r["prompt"]).stem
    assert rows(asked) == [[f"val/{annotation}/{p}", f"val/images/{p}", f"val/{annotation}/{q}"]
                           for q in others(r["prompt"])]


@pytest.mark.decoder
@pytest.mark.tokenizer
def test_generation_oracle_of_the_true_images_tokens_scores_the_round_trip_row(lvm, tokenizer, toy, monkeypatch):
    model_answering(monkeypatch, tokenizer, toy, true_image)
    r = eval_generation(lvm, tokenizer, toy, EvalConfig(limit=4, batch_size=3, annotation="edges"))
    assert r["model"] == pytest.approx(r["gt_rec"], rel=1e-6)  # FID, IS, PSNR (FID: to rounding)
    truth = torch.stack([pictures(toy)[f"val/images/{q}"] for q in others(r["prompt"])])
    expected = psnr(round_trip(tokenizer, truth).float() / 255, truth.float() / 255).mean().item()
    assert r["gt_rec"]["psnr"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.decoder
@pytest.mark.tokenizer
@pytest.mark.inference
def test_segmentation_protocol_on_the_toy_world(lvm, tokenizer, toy, tmp_path):
    r = eval_segmentation(lvm, tokenizer, toy, EvalConfig(**FAST, out=str(tmp_path)))
    assert r["num_classes"] == 4 and 0 <= r["model"]["miou"] <= 100 and 0 <= r["gt_rec"]["miou"] <= 100
    assert math.isfinite(r["model"]["fid"]) and (tmp_path / "segmentation_toy.png").is_file()


@pytest.mark.decoder
@pytest.mark.tokenizer
@pytest.mark.inference
def test_segmentation_prompt_is_image_then_map_then_the_query_image(lvm, tokenizer, toy, monkeypatch):
    asked = model_answering(monkeypatch, tokenizer, toy)
    r = eval_segmentation(lvm, tokenizer, toy, EvalConfig(limit=4, batch_size=3))
    p = Path(r["prompt"]).stem
    assert rows(asked) == [[f"val/images/{p}", f"val/segmentation/{p}", f"val/images/{q}"]
                           for q in others(r["prompt"])]


@pytest.mark.decoder
@pytest.mark.tokenizer
@pytest.mark.inference
def test_segmentation_of_an_oracle_scores_100_miou(lvm, tokenizer, toy, monkeypatch):
    """A "model" that answers with the true map of each query: mIoU 100 and FID 0, so queries meet their truths."""
    cfg = EvalConfig(limit=4, batch_size=3)
    model_painting(monkeypatch, tokenizer, toy, lambda names, n: pictures(toy)[true_map(names, n)[0]][None])
    r = eval_segmentation(lvm, tokenizer, toy, cfg)
    assert r["model"]["miou"] == pytest.approx(100) and r["model"]["fid"] == pytest.approx(0, abs=1e-6)


@pytest.mark.decoder
@pytest.mark.tokenizer
@pytest.mark.inference
def test_segmentation_oracle_of_the_true_maps_tokens_scores_the_round_trip_row(lvm, tokenizer, toy, monkeypatch):
    """A model answering each query with its true map's tokens gives the VQ-GAN's round trip of the truth: it scores
    the "Ground truth rec." row exactly (that row: the decoded true maps read back by nearest palette colour), every
    answer token right."""
    model_answering(monkeypatch, tokenizer, toy, true_map)
    r = eval_segmentation(lvm, tokenizer, toy, EvalConfig(limit=4, batch_size=3))
    assert r["model"]["miou"] == r["gt_rec"]["miou"]
    assert r["model"]["fid"] == pytest.approx(r["gt_rec"]["fid"], rel=1e-6)
    assert r["model"]["token_accuracy"] == 100
    maps = [pictures(toy)[f"val/segmentation/{q}"] for q in others(r["prompt"])]
    read_back = colors_to_classes(round_trip(tokenizer, maps).permute(0, 2, 3, 1), PALETTES["toy"])
    assert r["gt_rec"]["miou"] == pytest.approx(100 * mean_iou(read_back, classes(maps), 4), rel=1e-6)


@pytest.mark.decoder
@pytest.mark.tokenizer
@pytest.mark.inference
def test_segmentation_all_background_answer_scores_the_background_row(lvm, tokenizer, toy, monkeypatch):
    model_painting(monkeypatch, tokenizer, toy, lambda names, n: torch.zeros(n, 3, 32, 32, dtype=torch.uint8))
    r = eval_segmentation(lvm, tokenizer, toy, EvalConfig(limit=4, batch_size=3))
    labels = classes([pictures(toy)[f"val/segmentation/{q}"] for q in others(r["prompt"])])
    # class 0 everywhere: the background's IoU is its share of the pixels, every other class present scores 0
    expected = 100 * (labels == 0).float().mean().item() / len(labels.unique())
    assert r["model"]["miou"] == r["first_class"]["miou"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.decoder
@pytest.mark.tokenizer
@pytest.mark.inference
def test_token_accuracy_counts_codes_equal_to_the_querys_own_true_map(lvm, tokenizer, toy, monkeypatch):
    """A model that answers each query with the previous query's true map is right only where the two maps' codes
    agree."""
    queries = VAL[:4]  # with a prompt from the training split, every held-out picture is a query
    previous = dict(zip(queries, queries[-1:] + queries[:-1]))
    model_answering(monkeypatch, tokenizer, toy,
                    lambda names, n: [f"val/segmentation/{previous[names[-1].split('/')[-1]]}"])
    r = eval_segmentation(lvm, tokenizer, toy, EvalConfig(limit=4, batch_size=3, prompt_split="train"))
    codes = lambda stems: encode(tokenizer, [pictures(toy)[f"val/segmentation/{s}"] for s in stems])
    expected = 100 * (codes(queries) == codes(previous.values())).float().mean().item()
    assert expected < 100 and r["model"]["token_accuracy"] == pytest.approx(expected)


@pytest.mark.decoder
@pytest.mark.tokenizer
@pytest.mark.inference
def test_task_prompt_is_a_pair_of_the_task_then_the_query_with_one_prompt_picture_for_all(lvm, tokenizer, toy,
                                                                                          monkeypatch):
    """Each task's prompt is its own "query, answer" pair of the same training picture, then the held-out query."""
    asked = model_answering(monkeypatch, tokenizer, toy)
    cfg = EvalConfig(limit=4, batch_size=4, prompt_split="train")
    evaluate.eval_tasks(lvm, tokenizer, toy, cfg)
    folders = {"segmentation": ("images", "segmentation"), "edges": ("images", "edges"), "depth": ("images", "depth"),
               "inpainting": ("masked", "images"), "colorization": ("grey", "images")}
    p = asked[0][0][0].split("/")[-1]
    assert asked == [[[f"train/{query}/{p}", f"train/{answer}/{p}", f"val/{query}/{q}"] for q in VAL[:4]]
                     for query, answer in (folders[task] for task in cfg.tasks)]  # a call per task, in order


@pytest.mark.decoder
@pytest.mark.tokenizer
@pytest.mark.inference
def test_task_protocol_credits_an_oracle_with_every_task_and_query(lvm, tokenizer, toy, monkeypatch):
    """A "model" that answers each query with its true annotation for the prompt's task: every answer is nearest
    its own task's truth and its own query's."""
    cfg = EvalConfig(limit=4, batch_size=4, prompt_split="train")
    asked = iter(cfg.tasks)  # one batch per task, the tasks in order

    def oracle(model, vq, prompt, n, c, gen):
        task = next(asked)
        ds, _, _, queries = evaluate._prompt_and_queries(toy, cfg, task)
        answers = torch.stack([read_pair(ds, u, 32)[1] for u in queries])
        return answers[:, None], evaluate.images_to_tokens(vq, answers)

    monkeypatch.setattr(evaluate, "_sample", oracle)
    r = evaluate.eval_tasks(lvm, tokenizer, toy, cfg)
    assert cfg.tasks == ("segmentation", "edges", "depth", "inpainting", "colorization")
    assert r["identified"] == r["uses_query"] == {t: 100.0 for t in cfg.tasks}
    # the candidates: every picture the query's picture has, the queries of inpainting and
    # colorization (copying them is a miss) among them
    assert set(r["nearest"]["edges"]) == {"images", "segmentation", "edges", "depth", "masked", "grey"}
    assert r["nearest"]["inpainting"]["images"] == 100.0 and r["nearest"]["inpainting"]["masked"] == 0.0
    assert "| edges | **100.0** |" in evaluate.markdown_table([r])


@pytest.mark.decoder
@pytest.mark.tokenizer
@pytest.mark.inference
def test_task_protocol_counts_a_copied_query_as_a_miss(lvm, tokenizer, toy, monkeypatch):
    """A "model" that answers with its query: inpainting and colorization are never identified (the answer is
    the masked or grey picture), and the image tasks' answers are the picture itself, no map."""
    cfg = EvalConfig(limit=4, batch_size=4, prompt_split="train")
    copies = []  # one batch per task, the tasks in order
    for task in cfg.tasks:
        ds, _, _, queries = evaluate._prompt_and_queries(toy, cfg, task)
        copies.append(torch.stack([read_pair(ds, u, 32)[0] for u in queries]))

    def copy_query(model, vq, prompt, n, c, gen):
        answers = copies.pop(0)
        return answers[:, None], evaluate.images_to_tokens(vq, answers)

    monkeypatch.setattr(evaluate, "_sample", copy_query)
    r = evaluate.eval_tasks(lvm, tokenizer, toy, cfg)
    assert r["identified"] == {t: 0.0 for t in cfg.tasks}
    assert r["nearest"]["inpainting"]["masked"] == r["nearest"]["colorization"]["grey"] == 100.0


@pytest.mark.decoder
@pytest.mark.tokenizer
@pytest.mark.inference
def test_mapping_probe_of_an_oracle_reaches_the_oracle_and_shown_grows(lvm, tokenizer, mapping_world, monkeypatch):
    """A "model" that answers with the query's recoloured map: read by its group's palette, every class is
    right at every count (so the read-out uses the query's own palette), and the share of classes the prompt shows
    never shrinks as pairs are added."""
    model_painting(monkeypatch, tokenizer, mapping_world,
                   lambda names, n: pictures(mapping_world)[renamed(names[-1], "recoloured")][None])
    r = evaluate.eval_mapping(lvm, tokenizer, mapping_world, EvalConfig(batch_size=16), counts=(1, 2, 4, 7))
    assert r["prompt_pairs"] == [1, 2, 4, 7] and r["queries"] == 16
    # exact answers read by each group's own palette: every class right; the oracle row is the tokenizer's
    # round trip (here an untrained one), which can only lose
    assert r["miou"] == [pytest.approx(100)] * 4
    assert 0 <= r["oracle"] < 100
    assert r["shown"] == sorted(r["shown"]) and r["shown"][-1] <= 100


@pytest.mark.decoder
@pytest.mark.tokenizer
@pytest.mark.inference
def test_mapping_prompt_is_the_next_pictures_of_the_querys_group_then_the_query(lvm, tokenizer, mapping_world,
                                                                                 monkeypatch):
    """k pairs "picture, its recoloured map" of the k pictures after the query in its group of 8 (cyclically), then
    the query; a model answering the true recoloured map's tokens scores the oracle row, every token right."""
    asked = model_answering(monkeypatch, tokenizer, mapping_world,
                            lambda names, n: [renamed(names[-1], "recoloured")])
    r = evaluate.eval_mapping(lvm, tokenizer, mapping_world, EvalConfig(batch_size=16), counts=(1, 2))
    for k, (call,) in zip((1, 2), [asked[:1], asked[1:]]):
        for i, row in enumerate(call):
            group = i // 8 * 8
            shown = [group + (i + j) % 8 for j in range(1, k + 1)]
            pairs = [f"val/{folder}/{s:05d}" for s in shown for folder in ("images", "recoloured")]
            assert row == pairs + [f"val/images/{i:05d}"]
    assert r["miou"] == [r["oracle"]] * 2 and r["token_accuracy"] == [100.0] * 2


def test_copyable_cells_are_the_cells_some_prompt_frame_showed():
    clips = torch.zeros(1, 4, 3, 16, 16, dtype=torch.uint8)  # 2x2 cells of 8 px
    clips[0, 0, :, :8, :8] = 200  # frame 0 shows a bright cell at the top left
    clips[0, 2, :, 8:, 8:] = 200  # the bright cell moved: copyable (frame 0 showed it)
    clips[0, 3, :, :8, 8:] = 90  # a new grey cell: not copyable
    got = evaluate.copyable_cells(clips, 2, 4)  # frames 2 and 3 after a 2-frame prompt, 4 cells each
    assert got.tolist() == [[[True, True, True, True], [True, False, True, True]]]


@pytest.mark.decoder
@pytest.mark.tokenizer
@pytest.mark.inference
def test_in_context_curve_asks_the_same_queries_after_0_to_7_pairs(lvm, tokenizer, curve_world, tmp_path,
                                                                   monkeypatch):
    """The same queries in the same order at every count, each after k pairs "image, map" of distinct training
    pictures, a count's pairs those of the count before and more."""
    asked = model_answering(monkeypatch, tokenizer, curve_world, true_map)
    c = evaluate.eval_curve(lvm, tokenizer, curve_world, EvalConfig(limit=2, batch_size=2, prompt_split="train",
                                                                    out=str(tmp_path)))
    assert c["prompt_pairs"] == [0, 1, 2, 4, 7] and c["queries"] == 2 and len(asked) == 5  # a batch per count
    prompts = []
    for k, call in zip(c["prompt_pairs"], asked):
        assert [row[-1] for row in call] == ["val/images/00000", "val/images/00001"]
        prompt = call[0][:-1]
        stems = [name.split("/")[-1] for name in prompt[::2]]
        assert call[1][:-1] == prompt and len(set(stems)) == k
        assert prompt == [f"train/{folder}/{s}" for s in stems for folder in ("images", "segmentation")]
        prompts.append(prompt)
    assert all(more[:len(fewer)] == fewer for fewer, more in zip(prompts, prompts[1:]))
    assert c["token_accuracy"] == [100.0] * 5 and len(set(c["miou"])) == 1  # the truth's tokens at every count
    assert Image.open(c["plot"]).size == (420, 260)


@pytest.mark.decoder
@pytest.mark.tokenizer
@pytest.mark.inference
@pytest.mark.parametrize("layout", ["ade20k", "cityscapes"])
def test_segmentation_and_generation_on_real_dataset_layouts(lvm, tokenizer, tmp_path, layout):
    root = make_ade20k(tmp_path / "ADEChallengeData2016") if layout == "ade20k" else make_cityscapes(tmp_path)
    seg = eval_segmentation(lvm, tokenizer, tmp_path, EvalConfig(**FAST))
    gen = eval_generation(lvm, tokenizer, root, EvalConfig(**FAST))
    assert seg["dataset"] == gen["dataset"] == layout and seg["queries"] == gen["queries"] == 2
    assert seg["num_classes"] == {"ade20k": 150, "cityscapes": 19}[layout] and math.isfinite(seg["gt_rec"]["miou"])


def write_tokens(prefix, kind, tokens, **meta):
    tokens.astype(np.uint16).tofile(f"{prefix}.tokens")
    meta = dict(kind=kind, tokens_per_image=tokens.shape[1], num_images=len(tokens), image_size=32, vocab_size=512,
                sources=[], skipped=[], tokenizer={}) | meta
    with open(f"{prefix}.json", "w") as f:
        json.dump(meta, f)


def loss_by_hand(model, seqs, codebook):
    """(mean cross-entropy in nats, top-1 accuracy in %) of each token after the first given the ones before it,
    over the codebook's logits, from the model's forward."""
    with torch.no_grad():
        logits = model(seqs[:, :-1])[0][..., :codebook].double()  # position t predicts token t + 1
    targets = seqs[:, 1:]
    nll = -logits.log_softmax(-1).gather(-1, targets[..., None]).mean().item()
    return nll, 100 * (logits.argmax(-1) == targets).double().mean().item()


@pytest.mark.decoder
@pytest.mark.data
def test_perplexity_equals_the_cross_entropy_of_the_same_sequences_by_hand(lvm, tmp_path):
    rng = np.random.default_rng(0)
    write_tokens(tmp_path / "val_video", "video", rng.integers(0, 512, (40, 64)), groups=[[0, 20], [20, 20]])
    r = eval_perplexity(lvm, tmp_path / "val_video", EvalConfig(num_sequences=3, batch_size=2))
    m = r["model"]["natural"]
    data, rng = load_tokens(tmp_path / "val_video"), np.random.default_rng(0)  # the protocol's draws (seed 0)
    loss, accuracy = loss_by_hand(lvm, torch.from_numpy(np.stack([natural_sequence(data, rng, n_images=16)
                                                                  for _ in range(3)])), 512)
    assert m["loss"] == pytest.approx(loss, abs=1e-5) and m["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert m["accuracy"] == pytest.approx(accuracy) and m["tokens"] == 3 * 1023


@pytest.mark.decoder
@pytest.mark.data
def test_perplexity_of_pairs_scores_both_orders_over_the_codebook(lvm, tmp_path):
    """"image, annotation" then "annotation, image" sequences of the same draws, each scored over the 500 codes of the
    tokenizer (the model's vocabulary has 512)."""
    rng = np.random.default_rng(0)
    write_tokens(tmp_path / "val_seg", "pairs", rng.integers(0, 500, (12, 64)), groups=[[0, 12]], vocab_size=500,
                 annotation="segmentation", palette=PALETTES["toy"].tolist())
    r = eval_perplexity(lvm, tmp_path / "val_seg", EvalConfig(num_sequences=2))
    data, rng = load_tokens(tmp_path / "val_seg"), np.random.default_rng(0)
    for name, build in (("discriminative", discriminative_sequence), ("generative", generative_sequence)):
        seqs = torch.from_numpy(np.stack([build(data, rng, n_pairs=8) for _ in range(2)]))
        loss, accuracy = loss_by_hand(lvm, seqs, 500)
        assert r["model"][name]["loss"] == pytest.approx(loss, abs=1e-5)
        assert r["model"][name]["accuracy"] == pytest.approx(accuracy)
    assert list(r["model"]) == ["discriminative", "generative"]


def save_for_the_command_line(lvm, tokenizer, folder):
    torch.save({"model": lvm.state_dict(), "model_args": dataclasses.asdict(lvm.args)}, folder / "ckpt.pt")
    vqgan_checkpoint.save_pretrained(tokenizer, folder / "vq")
    return ["--model", str(folder / "ckpt.pt"), "--vqgan", str(folder / "vq")]


@pytest.mark.decoder
@pytest.mark.tokenizer
@pytest.mark.inference
def test_command_line_writes_a_table_json_and_a_grid_per_condition(lvm, tokenizer, toy, tmp_path):
    out = tmp_path / "eval"
    evaluate.main(["generation", *save_for_the_command_line(lvm, tokenizer, tmp_path), "--data", str(toy),
                   "--features", "tiny", "--limit", "2", "--annotation", "segmentation,edges", "--out", str(out),
                   "--name", "tiny"])
    tables = (out / "tables.md").read_text()
    assert tables.startswith("## Conditional image generation (Table 2)")
    assert "toy seg. FID ↓" in tables and "toy edge IS ↑" in tables
    assert "| tiny |" in tables and "| Ground truth rec. |" in tables and "not comparable with the paper" in tables
    results = json.loads((out / "results.json").read_text())
    assert [(r["protocol"], r["condition"]) for r in results] == [("generation", "segmentation"),
                                                                  ("generation", "edges")]
    assert all((out / f"generation_toy_{a}.png").is_file() for a in ("segmentation", "edges"))


def stub_protocols(monkeypatch):
    """Replace every protocol function by one that records (protocol, config) and returns {}, and write_results by
    one that records the results it is given: what the command line runs, without running it."""
    calls, written = [], []
    for protocol in ("video", "generation", "segmentation", "tasks", "curve", "perplexity"):
        monkeypatch.setattr(evaluate, f"eval_{protocol}",
                            lambda *args, protocol=protocol: calls.append((protocol, args[-1])) or {})
    monkeypatch.setattr(evaluate, "write_results", lambda results, *args: written.append(results) or "")
    return calls, written


@pytest.mark.decoder
@pytest.mark.tokenizer
def test_command_line_all_runs_every_protocol_with_its_options(lvm, tokenizer, toy, tmp_path, monkeypatch):
    """'all' on the toy world: each protocol once, generation once per condition, in the paper's order, with the
    command line's options and one feature network per kind (the protocols themselves are tested above)."""
    calls, written = stub_protocols(monkeypatch)
    evaluate.main(["all", *save_for_the_command_line(lvm, tokenizer, tmp_path), "--data", str(toy),
                   "--tokens", "A", "B", "--features", "tiny", "--limit", "2", "--clip_frames", "6",
                   "--prompt_frames", "4", "--annotation", "segmentation,edges", "--out", str(tmp_path / "eval")])
    assert [p for p, _ in calls] == ["video", "generation", "generation", "segmentation", "tasks", "curve",
                                     "perplexity", "perplexity"]
    assert [cfg.annotation for p, cfg in calls if p == "generation"] == ["segmentation", "edges"]
    assert all((cfg.limit, cfg.clip_frames, cfg.prompt_frames) == (2, 6, 4) for _, cfg in calls)
    assert calls[0][1].video_extractor is not None and calls[0][1].image_extractor is None
    image = {id(cfg.image_extractor) for p, cfg in calls[1:6]}
    assert len(image) == 1 and calls[1][1].image_extractor is not None  # loaded once
    assert len(written) == 1 and len(written[0]) == 8


@pytest.mark.decoder
@pytest.mark.tokenizer
def test_command_line_all_on_ade20k_runs_what_it_has_and_skips_the_rest(lvm, tokenizer, tmp_path, monkeypatch):
    """'all' on a real dataset: segmentation, its generation and its in-context curve run; video, the toy world's
    other conditions and its task checks are skipped, not an error."""
    calls, written = stub_protocols(monkeypatch)
    evaluate.main(["all", *save_for_the_command_line(lvm, tokenizer, tmp_path), "--data",
                   str(make_ade20k(tmp_path / "ade")), "--features", "tiny", "--annotation", "segmentation,edges",
                   "--out", str(tmp_path / "eval")])
    assert [(p, cfg.annotation) for p, cfg in calls] == [("generation", "segmentation"),
                                                          ("segmentation", "segmentation"),
                                                          ("curve", "segmentation")]
    assert len(written) == 1


@pytest.mark.decoder
@pytest.mark.tokenizer
@pytest.mark.data
@pytest.mark.inference
def test_tables_come_in_the_papers_order_with_their_baseline_rows(lvm, tokenizer, toy, tmp_path, monkeypatch):
    """Whatever order the results come in: Tables 1-3, each with its "Ground truth rec." row (and Table 1 the
    repeat-last one), then the task, curve and held-out loss tables."""
    model_answering(monkeypatch, tokenizer, toy, lambda names, n: names[-1:] * n)  # no sampling: layout only
    write_tokens(tmp_path / "val_video", "video", np.random.default_rng(0).integers(0, 512, (16, 64)),
                 groups=[[0, 16]])
    cfg = EvalConfig(**FAST)
    results = [eval_video(lvm, tokenizer, toy, cfg), eval_generation(lvm, tokenizer, toy, cfg),
               eval_segmentation(lvm, tokenizer, toy, cfg), evaluate.eval_tasks(lvm, tokenizer, toy, cfg),
               evaluate.eval_curve(lvm, tokenizer, toy, cfg),
               eval_perplexity(lvm, tmp_path / "val_video", EvalConfig(num_sequences=1))]
    text = evaluate.write_results(results[::-1], tmp_path / "eval", "tiny")
    titles = ["Video prediction (Table 1)", "Conditional image generation (Table 2)",
              "Semantic segmentation (Table 3)", "The prompt chooses the task", "In-context curve",
              "Held-out next-token prediction"]
    sections = text.split("## ")[1:]
    assert [s.splitlines()[0] for s in sections] == titles
    assert all("| tiny |" in s and "| Ground truth rec. |" in s for s in sections[:3])
    assert "| Repeat last prompt frame |" in sections[0] and "Repeat last" not in "".join(sections[1:])
    assert "toy seg. FID ↓" in sections[1] and "| tiny | val_video | natural |" in sections[5]
    assert [r["protocol"] for r in json.loads((tmp_path / "eval" / "results.json").read_text())] == [
        "perplexity", "curve", "tasks", "segmentation", "generation", "video"]


@pytest.mark.decoder
def test_command_line_explains_missing_weights(lvm, toy, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(SystemExit, match="i3d_torchscript.pt"):  # before any tokenizing: a VQ-GAN as it is built
        evaluate.main(["video", *save_for_the_command_line(lvm, vqgan.VQGAN(vqgan.CONFIGS["toy"]), tmp_path),
                       "--data", str(toy), "--out", str(tmp_path / "eval")])
