"""Evaluation: the metrics (metrics.py) against independent computations and hand-built answers, the feature
extractors offline, and every protocol end to end on the toy world and on tiny folders in the ADE20K, Cityscapes
and UCF-101 layouts."""
import dataclasses
import json
import math
import sys

import av
import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

import evaluate
import toyworld
import vqgan
from data import load_tokens, natural_sequence
import features
from evaluate import (EvalConfig, eval_generation, eval_perplexity, eval_segmentation, eval_video, find_paired,
                      find_videos, read_pair)
from features import I3DExtractor, InceptionExtractor, TinyExtractor
from metrics import colors_to_classes, frechet_distance, inception_score, labels_from_colours, mean_iou, psnr, ssim
from model import ModelArgs, Transformer
from images import PALETTES

TINY = dict(dim=32, n_layers=1, n_heads=2, hidden_dim=64, vocab_size=512, max_seq_len=1024)
FAST = dict(limit=2, batch_size=2, clip_frames=6, prompt_frames=4)  # short clips keep sampling quick on a CPU


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def lvm():
    torch.manual_seed(0)
    return Transformer(ModelArgs(**TINY)).eval()


@pytest.fixture(scope="module")
def tokenizer():
    torch.manual_seed(0)
    return vqgan.VQGAN(vqgan.CONFIGS["toy"]).eval()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy") / "toyworld"
    toyworld.generate(root, seed=0, num_images=3, num_val_images=5, num_videos=1, num_val_videos=3, frames=16)
    return root


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
def test_segmentation_protocol_on_the_toy_world(lvm, tokenizer, toy, tmp_path):
    r = eval_segmentation(lvm, tokenizer, toy, EvalConfig(**FAST, out=str(tmp_path)))
    assert r["num_classes"] == 4 and 0 <= r["model"]["miou"] <= 100 and 0 <= r["gt_rec"]["miou"] <= 100
    assert math.isfinite(r["model"]["fid"]) and (tmp_path / "segmentation_toy.png").is_file()


@pytest.mark.decoder
@pytest.mark.tokenizer
@pytest.mark.inference
def test_segmentation_of_an_oracle_scores_100_miou(lvm, tokenizer, toy, monkeypatch):
    """A "model" that answers with the true map of each query: mIoU 100 and FID 0, so queries meet their truths."""
    cfg = EvalConfig(limit=4, batch_size=3)
    ds, _, (prompt,), queries = evaluate._prompt_and_queries(toy, cfg, "segmentation")
    assert len(queries) == 4 and prompt not in queries
    truths = iter([read_pair(ds, u, 32)[1] for u in queries])
    def oracle(model, vq, prompt, n, cfg, gen):
        answers = torch.stack([next(truths) for _ in range(len(prompt))])
        return answers[:, None], evaluate.images_to_tokens(vq, answers)

    monkeypatch.setattr(evaluate, "_sample", oracle)
    r = eval_segmentation(lvm, tokenizer, toy, cfg)
    assert r["model"]["miou"] == pytest.approx(100) and r["model"]["fid"] == pytest.approx(0, abs=1e-6)
    assert r["model"]["token_accuracy"] == pytest.approx(100)


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
def test_mapping_probe_of_an_oracle_reaches_the_oracle_and_shown_grows(lvm, tokenizer, toy, monkeypatch):
    """A "model" that answers with the query's recoloured map: read by its group's palette, every class is
    right at every count (so the read-out uses the query's own palette), every answer token is right, and the
    share of classes the prompt shows never shrinks as pairs are added."""
    toyworld.generate(toy.parent / "mapping", seed=0, num_images=0, num_val_images=16, num_videos=0,
                      num_val_videos=0)
    world = toy.parent / "mapping"
    names = sorted((world / "val" / "recoloured").glob("*.png"))
    truth = torch.stack([torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1) for f in names])

    def oracle(model, vq, prompt, n, c, gen):  # the 16 queries in one batch, in order
        return truth[:, None], evaluate.images_to_tokens(vq, truth)

    cfg = EvalConfig(batch_size=16)
    monkeypatch.setattr(evaluate, "_sample", oracle)
    r = evaluate.eval_mapping(lvm, tokenizer, world, cfg, counts=(1, 2, 4, 7))
    assert r["prompt_pairs"] == [1, 2, 4, 7] and r["queries"] == 16
    # exact answers read by each group's own palette: every class right; the oracle row is the tokenizer's
    # round trip (here an untrained one), which can only lose
    assert r["miou"] == [pytest.approx(100)] * 4 and r["token_accuracy"] == [pytest.approx(100)] * 4
    assert 0 <= r["oracle"] < 100
    assert r["shown"] == sorted(r["shown"]) and r["shown"][-1] <= 100


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
def test_in_context_curve_asks_the_same_queries_after_0_to_7_pairs(lvm, tokenizer, tmp_path):
    root = tmp_path / "world"
    toyworld.generate(root, seed=0, num_images=8, num_val_images=3, num_videos=1, num_val_videos=1, frames=2)
    c = evaluate.eval_curve(lvm, tokenizer, root, EvalConfig(limit=2, batch_size=2, prompt_split="train",
                                                              out=str(tmp_path)))
    assert c["prompt_pairs"] == [0, 1, 2, 4, 7] and c["queries"] == 2
    assert len(c["miou"]) == 5 and all(0 <= v <= 100 for v in c["token_accuracy"] + c["miou"])
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
                sources=[], skipped=[], tokenizer={}, **meta)
    with open(f"{prefix}.json", "w") as f:
        json.dump(meta, f)


@pytest.mark.decoder
@pytest.mark.data
def test_perplexity_equals_the_models_own_loss(lvm, tmp_path):
    rng = np.random.default_rng(0)
    write_tokens(tmp_path / "val_video", "video", rng.integers(0, 512, (40, 64)), groups=[[0, 20], [20, 20]])
    r = eval_perplexity(lvm, tmp_path / "val_video", EvalConfig(num_sequences=3, batch_size=2))
    m = r["model"]["natural"]
    data, rng = load_tokens(tmp_path / "val_video"), np.random.default_rng(0)
    x = torch.from_numpy(np.stack([natural_sequence(data, rng, n_images=16) for _ in range(3)]))
    with torch.no_grad():
        loss = lvm(x[:, :-1], x[:, 1:])[1].item()
    assert m["loss"] == pytest.approx(loss, rel=1e-4) and m["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert m["tokens"] == 3 * 1023 and 0 <= m["accuracy"] <= 100


@pytest.mark.decoder
@pytest.mark.data
def test_perplexity_of_pairs_reports_both_orders(lvm, tmp_path):
    rng = np.random.default_rng(0)
    write_tokens(tmp_path / "val_seg", "pairs", rng.integers(0, 512, (12, 64)), groups=[[0, 12]],
                 annotation="segmentation", palette=PALETTES["toy"].tolist())
    r = eval_perplexity(lvm, tmp_path / "val_seg", EvalConfig(num_sequences=2))
    assert set(r["model"]) == {"discriminative", "generative"}
    assert all(abs(m["loss"] - math.log(512)) < 1.0 for m in r["model"].values())  # a random model: ~ln(codebook)


@pytest.mark.decoder
@pytest.mark.tokenizer
@pytest.mark.data
@pytest.mark.inference
def test_command_line_writes_tables_json_and_grids(lvm, tokenizer, toy, tmp_path):
    torch.save({"model": lvm.state_dict(), "model_args": dataclasses.asdict(lvm.args)}, tmp_path / "ckpt.pt")
    vqgan.save_pretrained(tokenizer, tmp_path / "vq")
    write_tokens(tmp_path / "val_video", "video", np.random.default_rng(0).integers(0, 512, (20, 64)),
                 groups=[[0, 20]])
    out = tmp_path / "eval"
    evaluate.main(["all", "--model", str(tmp_path / "ckpt.pt"), "--vqgan", str(tmp_path / "vq"), "--data", str(toy),
                   "--tokens", str(tmp_path / "val_video"), "--features", "tiny", "--limit", "2", "--clip_frames", "6",
                   "--prompt_frames", "4", "--annotation", "segmentation,edges", "--out", str(out), "--name", "tiny"])
    tables = (out / "tables.md").read_text()
    for title in ("Table 1", "Table 2", "Table 3", "next-token"):
        assert title in tables
    assert "| Ground truth rec. |" in tables and "toy seg. FID ↓" in tables and "toy edge IS ↑" in tables
    assert "not comparable with the paper" in tables
    results = json.loads((out / "results.json").read_text())
    assert [r["protocol"] for r in results] == ["video", "generation", "generation", "segmentation", "tasks", "curve",
                                                "perplexity"]
    assert results[5]["prompt_pairs"] == [0, 1, 2, 4] and "The prompt chooses the task" in tables
    assert all((out / f"{name}.png").is_file() for name in ("video_toy", "segmentation_toy",
                                                             "generation_toy_edges"))


@pytest.mark.decoder
def test_command_line_explains_missing_weights(lvm, tokenizer, toy, tmp_path, monkeypatch):
    torch.save({"model": lvm.state_dict(), "model_args": dataclasses.asdict(lvm.args)}, tmp_path / "ckpt.pt")
    vqgan.save_pretrained(tokenizer, tmp_path / "vq")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(SystemExit, match="i3d_torchscript.pt"):
        evaluate.main(["video", "--model", str(tmp_path / "ckpt.pt"), "--vqgan", str(tmp_path / "vq"),
                       "--data", str(toy), "--out", str(tmp_path / "eval")])
