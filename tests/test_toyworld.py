"""The toy world: deterministic, laid out for tokenize_data's generic readers, annotations consistent with the
pictures, classes decided by shape (not colour), videos fast and bouncing."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tokenize_data
import toyworld

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(num_images=12, num_val_images=4, num_videos=2, num_val_videos=1, frames=16)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "world"
    toyworld.generate(out, seed=0, workers=1, **SMALL)
    return out


def _png(path):
    return np.asarray(Image.open(path))


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path, world):
    toyworld.generate(tmp_path / "again", seed=0, workers=2, **SMALL)  # other worker count: same bytes
    files = sorted(p.relative_to(world) for p in world.rglob("*.png"))
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*.png"))
    assert all((world / f).read_bytes() == (tmp_path / "again" / f).read_bytes() for f in files)
    toyworld.generate(tmp_path / "other", seed=1, **SMALL)
    assert (world / "train/images/00000.png").read_bytes() != (tmp_path / "other/train/images/00000.png").read_bytes()


def test_command_line_writes_train_and_val_splits(tmp_path):
    out = tmp_path / "w"
    args = ["--num_images", "3", "--num_val_images", "2", "--num_videos", "1", "--num_val_videos", "1"]
    r = subprocess.run([sys.executable, "toyworld.py", "--out", str(out), "--seed", "3", *args], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for split, n in (("train", 3), ("val", 2)):
        for kind in ("images", "segmentation", "edges", "depth"):
            assert len(list((out / split / kind).glob("*.png"))) == n
        assert len(list((out / split / "videos" / "0000").glob("*.png"))) == toyworld.DEFAULTS["frames"]
    assert _png(out / "val/images/00001.png").shape == (32, 32, 3)


def test_generic_readers_find_every_image_video_and_pair(world):
    for split, (n, v) in (("train", (12, 2)), ("val", (4, 1))):
        assert [u[0] for u in tokenize_data.list_images([str(world / split / "images")])] == ["image"] * n
        assert [(u[0], len(u[2])) for u in tokenize_data.list_videos([str(world / split / "videos")])] == \
            [("frames", SMALL["frames"])] * v
        for ann in ("segmentation", "edges", "depth"):
            pairs = tokenize_data.list_pairs(str(world / split / "images"), str(world / split / ann))
            assert [u[0] for u in pairs] == ["pair"] * n
    assert (world / "val/images/00000.png").read_bytes() != (world / "train/images/00000.png").read_bytes()


def test_annotations_agree_with_each_other_and_use_the_fixed_palette(world):
    for i in range(SMALL["num_images"]):
        seg, edges, depth = (_png(world / "train" / k / f"{i:05d}.png") for k in ("segmentation", "edges", "depth"))
        classes = (seg[..., None, :] == toyworld.PALETTE).all(-1)
        assert classes.any(-1).all(), "segmentation maps hold palette colours only"
        foreground = ~classes[..., 0]
        assert foreground.any()
        assert np.array_equal(depth[..., 0] > 0, foreground), "depth is zero exactly on the background"
        assert set(np.unique(edges)) <= {0, 255} and edges[foreground].any()
        inner = foreground.copy()  # edges never lie deep inside the background
        for ax, sh in ((0, 1), (0, -1), (1, 1), (1, -1)):
            inner |= np.roll(foreground, sh, ax)
        assert not edges[..., 0][~inner].any()


def test_class_is_the_shape_not_its_colour():
    colours = {c: [] for c in range(1, len(toyworld.CLASSES))}
    for i in range(300):
        rng = np.random.default_rng(i)
        bg = toyworld.background(rng, 32)
        shapes = toyworld.sample_shapes(rng, bg, 32)
        image, classes, _, _ = toyworld.render(bg, shapes, 32)
        for c in colours:
            if (classes == c).any():
                colours[c].append(image[classes == c].mean(0))
    for c, cs in colours.items():
        assert len(cs) > 50 and np.std(cs, axis=0).min() > 50, f"{toyworld.CLASSES[c]} colours should vary widely"
    side = 15  # areas of the masks: square, disc (pi/4), apex-up triangle (1/2)
    area = {c: toyworld.shape_mask(c, 8, 8, side, 32).sum() / side ** 2 for c in colours}
    assert area[1] == 1 and abs(area[2] - np.pi / 4) < 0.05 and abs(area[3] - 0.5) < 0.08


def test_shapes_contrast_with_the_background():
    for i in range(100):
        rng = np.random.default_rng(i)
        bg = toyworld.background(rng, 32)
        for s in toyworld.sample_shapes(rng, bg, 32):
            under = bg[s["y"]:s["y"] + s["side"], s["x"]:s["x"] + s["side"]].reshape(-1, 3).mean(0)
            assert np.linalg.norm(s["colour"] - under) > 60


def test_bounce_keeps_constant_speed_and_reflects_at_the_borders():
    span, v = 20, 6
    expected, p, d = [], 3, 1  # reference: walk v single pixels per frame, turning round at the walls
    for t in range(40):
        expected.append(p)
        for _ in range(v):
            d = d if 0 <= p + d <= span else -d
            p += d
    assert [toyworld.bounce(3, v, t, span) for t in range(40)] == expected


def test_videos_move_at_least_a_token_cell_per_frame_so_copying_the_last_frame_fails(world):
    moved, changed = [], []
    for v in range(SMALL["num_videos"]):
        frames = np.stack([_png(p) for p in sorted((world / "train/videos" / f"{v:04d}").glob("*.png"))]).astype(int)
        assert len(frames) == SMALL["frames"]
        changed += [(np.abs(a - b).sum(-1) > 0).mean() for a, b in zip(frames[:-1], frames[1:])]
    for i in range(50):  # shapes' own trajectories: mean displacement per frame
        rng = np.random.default_rng(i)
        v = toyworld.velocity(rng)
        assert toyworld.MIN_SPEED <= np.hypot(*v) <= toyworld.MAX_SPEED
        xs = [toyworld.bounce(5, v[0], t, 20) for t in range(16)]
        ys = [toyworld.bounce(5, v[1], t, 20) for t in range(16)]
        moved.append(np.hypot(np.diff(xs), np.diff(ys)).mean())
    assert np.mean(moved) >= 4, "at least one 4-px token cell per frame on average"
    assert min(changed) > 0.02, "every frame differs from the previous one"
