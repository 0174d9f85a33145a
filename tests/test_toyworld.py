"""The toy world: deterministic, laid out for tokenize_data's generic readers, annotations consistent with the
pictures, classes readable from the hue, shapes on the grid, videos whose shapes move whole cells, palettes held out."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tokenize_data
from toy import toyworld

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
    r = subprocess.run([sys.executable, "toy/toyworld.py", "--out", str(out), "--seed", "3", *args], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for split, n in (("train", 3), ("val", 2)):
        for kind in ("images", "segmentation", "edges", "depth", "masked", "grey", "recoloured"):
            assert len(list((out / split / kind).glob("*.png"))) == n
        assert len(list((out / split / "videos" / "0000").glob("*.png"))) == toyworld.DEFAULTS["frames"]
    assert _png(out / "val/images/00001.png").shape == (32, 32, 3)


def test_generic_readers_find_every_image_video_and_pair(world):
    for split, (n, v) in (("train", (12, 2)), ("val", (4, 1))):
        assert [u[0] for u in tokenize_data.list_images([str(world / split / "images")])] == ["image"] * n
        assert [(u[0], len(u[2])) for u in tokenize_data.list_videos([str(world / split / "videos")])] == \
            [("frames", SMALL["frames"])] * v
        for query, answer in toyworld.TASKS.values():
            pairs = tokenize_data.list_pairs(str(world / split / query), str(world / split / answer))
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


def test_the_class_decides_the_hue_and_backgrounds_are_grey():
    for i in range(200):
        rng = np.random.default_rng(i)
        bg = toyworld.background(rng, 32)
        assert np.ptp(bg, axis=2).max() <= 2 * toyworld.TINT + 1e-9, "backgrounds are tinted greys"
        shapes = toyworld.sample_shapes(rng, 32)
        image, classes, _, _ = toyworld.render(bg, shapes)
        for s in shapes:
            assert np.abs(s["colour"] - toyworld.CLASS_COLOURS[s["cls"]]).max() <= toyworld.COLOUR_JITTER
        for c in range(1, len(toyworld.CLASSES)):  # each class's pixels are nearest its own hue
            if (classes == c).any():
                mean = image[classes == c].mean(0)
                assert np.linalg.norm(toyworld.CLASS_COLOURS[1:] - mean, axis=1).argmin() == c - 1
    side = 16  # areas of the masks: square, disc (pi/4), apex-up triangle (1/2)
    area = {c: toyworld.shape_mask(c, 8, 8, side, 32).sum() / side ** 2 for c in (1, 2, 3)}
    assert area[1] == 1 and abs(area[2] - np.pi / 4) < 0.05 and abs(area[3] - 0.5) < 0.08


def test_shapes_sit_inside_the_picture_on_the_grid():
    for i in range(100):
        for s in toyworld.sample_shapes(np.random.default_rng(i), 32):
            assert s["side"] in toyworld.SIDES and s["x"] % toyworld.GRID == 0 and s["y"] % toyworld.GRID == 0
            assert 0 <= s["x"] <= 32 - s["side"] and 0 <= s["y"] <= 32 - s["side"]


def test_inpainting_and_colorization_queries_are_the_picture_masked_or_grey(world):
    for i in range(SMALL["num_images"]):
        image, masked, grey = (_png(world / "train" / k / f"{i:05d}.png").astype(int)
                               for k in ("images", "masked", "grey"))
        hole = (masked != image).any(-1)
        ys, xs = np.nonzero(hole)
        assert len(ys) and not masked[hole].any(), "only a black square differs"
        assert ys.max() - ys.min() < toyworld.MASK and xs.max() - xs.min() < toyworld.MASK
        assert (grey[..., :1] == grey).all()
        assert np.abs(grey[..., 0] - image @ np.array([0.299, 0.587, 0.114])).max() <= 0.5


def test_recoloured_maps_share_a_palette_per_group_and_val_palettes_are_never_trained():
    train, val = ({tuple(p) for p in toyworld.palettes(s)} for s in ("train", "val"))
    assert len(train) == 120 - toyworld.HELD_OUT and len(val) == toyworld.HELD_OUT and not train & val
    rng = np.random.default_rng(0)
    for palette in toyworld.palettes("val")[:5]:
        out = toyworld.make_image(rng, 32, palette)
        classes = (out["segmentation"][..., None, :] == toyworld.PALETTE).all(-1).argmax(-1)
        colours = np.concatenate([[[0, 0, 0]], toyworld.MAP_COLOURS[palette]])
        assert np.array_equal(out["recoloured"], colours[classes])


def test_recoloured_pairs_are_tokenized_one_group_per_palette(world, tmp_path):
    jobs = {name: info for _, _, name, _, info in tokenize_data.toyworld_jobs(world)}
    assert jobs["train_recoloured"]["pairs_per_group"] == toyworld.GROUP["train"]
    assert {"train_inpainting", "val_colorization"} <= set(jobs) and "pairs_per_group" not in jobs["train_edges"]
    (tmp_path / "x.tokens.partial").write_bytes(b"")
    meta = tokenize_data._finish(tmp_path / "x", dict(kind="pairs", pairs_per_group=2), 10, [], [])
    assert meta["groups"] == [[0, 4], [4, 4], [8, 2]]


def test_video_shapes_move_one_cell_a_frame_so_later_cells_were_shown_before(world):
    for v in range(SMALL["num_videos"]):
        frames = np.stack([_png(p) for p in sorted((world / "train/videos" / f"{v:04d}").glob("*.png"))])
        assert len(frames) == SMALL["frames"]
        for a, b in zip(frames[:-1], frames[1:]):
            assert not np.array_equal(a, b), "something moves every frame"
    video = toyworld.make_video(np.random.default_rng(1), 32, 16)
    cells = video.reshape(16, 4, 8, 4, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(16, 16, -1)
    seen = {c.tobytes() for c in cells[:5].reshape(-1, cells.shape[-1])}
    assert np.mean([c.tobytes() in seen for c in cells[5:].reshape(-1, cells.shape[-1])]) > 0.9
    assert np.array_equal(video[12], video[0]), "the motion repeats every 12 frames"
