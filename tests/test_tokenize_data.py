"""Token files: every input kind and image mode, bad inputs listed not fatal, resume after kill -9, shards, pairs
matched by stem and coloured with the reference palettes, the sequence builders of the paper, the toy world."""
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tokenize_data as td
from toy import toyworld
import vqgan
from infra import vqgan_checkpoint
from conftest import raise_unfinished
from data import generative_sequence, load_tokens, natural_sequence
from infra.images import PALETTES, read_annotation, read_image

ROOT = Path(__file__).resolve().parents[1]
S = 64  # tokens per image of the small test tokenizer: 32x32 pixels, f = 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A small, randomly initialised VQ-GAN checkpoint (the real class, fewer channels): 32x32 -> 8x8 codes."""
    path = tmp_path_factory.mktemp("vqgan") / "tiny"
    torch.manual_seed(0)
    config = dict(vqgan.CONFIGS["toy"], hidden_channels=32, channel_mult=[1, 1, 1], z_channels=32,
                  num_embeddings=256, quantized_embed_dim=8)
    vqgan_checkpoint.save_pretrained(vqgan.VQGAN(config), path)
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    return vqgan_checkpoint.load_pretrained(ckpt, device="cpu")


def cli(*args, env=None, **kw):
    return raise_unfinished(subprocess.run([sys.executable, "tokenize_data.py", *map(str, args)], cwd=ROOT,
                                           capture_output=True, text=True,
                                           env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kw))


def encode_files(model, paths, size=32):
    pixels = torch.from_numpy(np.stack([read_image(p, size) for p in paths]))
    return td.encode(model, pixels)


def random_image(rng, w, h, mode="RGB"):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def make_mixed_folder(folder):
    """Good images of every mode and format, plus bad files. Returns (good paths in reading order, bad names)."""
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True)
    jpeg = io.BytesIO()
    random_image(rng, 64, 48).save(jpeg, "JPEG")
    (folder / "a_rgb.jpg").write_bytes(jpeg.getvalue())
    random_image(rng, 40, 70, "L").save(folder / "b_gray.png")
    Image.fromarray(np.full((40, 40), 65535, np.uint16)).save(folder / "c_gray16.png")  # 16-bit: white
    rgba = np.zeros((32, 32, 4), np.uint8)  # fully transparent: composited onto white
    Image.fromarray(rgba).save(folder / "d_rgba.png")
    random_image(rng, 50, 50).convert("P").save(folder / "e_palette.png")
    random_image(rng, 36, 36, "CMYK").save(folder / "f_cmyk.jpg")
    random_image(rng, 33, 33, "1").save(folder / "g_bilevel.bmp")
    random_image(rng, 48, 32).save(folder / "h_photo.webp")
    random_image(rng, 32, 32).save(folder / "i_scan.tiff")
    red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    red.save(folder / "j_anim.gif", save_all=True, append_images=[blue])
    random_image(rng, 32, 32, "LA").save(folder / "k_gray_alpha.png")
    random_image(rng, 45, 32).save(folder / "sub" / "l_nested.png")
    with tarfile.open(folder / "m_shard.tar", "w") as tar:  # img2dataset-style webdataset shard
        for name, data in (("000.jpg", jpeg.getvalue()), ("000.txt", b"a caption"), ("001.jpg", b"broken")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (folder / "n_truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (folder / "o_empty.png").write_bytes(b"")
    (folder / "p_notes.txt").write_text("not an image")
    (folder / "q_text.jpg").write_text("a text file with an image extension")
    good = sorted(p for p in folder.rglob("*") if p.suffix != ".tar" and p.name[0] < "n")
    return good, ["m_shard.tar:001.jpg", "n_truncated.jpg", "o_empty.png", "p_notes.txt", "q_text.jpg"]


@pytest.mark.tokenizer
def test_folder_of_every_mode_with_bad_files_exits_0_and_lists_each_bad_file(tmp_path, ckpt, model):
    good, bad = make_mixed_folder(tmp_path / "in")
    r = cli("images", "--input", tmp_path / "in", "--vqgan", ckpt, "--out", tmp_path / "out", "--name", "mixed",
            "--num_workers", 1, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    data = load_tokens(tmp_path / "out" / "mixed")
    meta = data.meta
    assert (meta["kind"], meta["num_images"], meta["tokens_per_image"], meta["vocab_size"]) == ("images", 13, S, 256)
    reasons = {Path(s["path"]).name: s["reason"] for s in meta["skipped"]}
    assert sorted(reasons) == bad
    assert "truncated" in reasons["n_truncated.jpg"] and "cannot identify" in reasons["o_empty.png"]
    assert "not one of the images (.txt)" in reasons["p_notes.txt"] and "cannot identify" in reasons["q_text.jpg"]
    # every good image is present, in reading order, with exactly the bare encoder's tokens
    tar_image = io.BytesIO(tarfile.open(tmp_path / "in" / "m_shard.tar").extractfile("000.jpg").read())
    expected = encode_files(model, good[:-1] + [tar_image, good[-1]])  # the shard sorts before sub/
    assert np.array_equal(data.tokens, expected)
    assert meta["tokenizer"]["path"] == str(ckpt) and len(meta["tokenizer"]["sha256"]) == 64


def test_image_modes_become_rgb_as_expected(tmp_path):
    good, _ = make_mixed_folder(tmp_path)
    pixels = {p.name: read_image(p, 32) for p in good}
    assert all(a.shape == (32, 32, 3) and a.dtype == np.uint8 for a in pixels.values())
    assert (pixels["c_gray16.png"] == 255).all() and (pixels["d_rgba.png"] == 255).all()
    assert (pixels["j_anim.gif"] == [255, 0, 0]).all(), "the first frame of a GIF"


def test_shorter_side_is_resized_then_centre_cropped_and_maps_stay_nearest(tmp_path):
    stripes = np.zeros((32, 96, 3), np.uint8)  # blue | green | red thirds: the centre crop is all green
    stripes[:, :32, 2], stripes[:, 32:64, 1], stripes[:, 64:, 0] = 255, 255, 255
    Image.fromarray(stripes).save(tmp_path / "wide.png")
    assert (read_image(tmp_path / "wide.png", 32) == [0, 255, 0]).all()
    Image.fromarray(np.kron(stripes, np.ones((2, 2, 1), np.uint8))).save(tmp_path / "big.png")  # 64x192
    assert (read_image(tmp_path / "big.png", 32)[:, 2:-2] == [0, 255, 0]).all()
    classes = np.random.default_rng(0).integers(0, 4, (45, 61)).astype(np.uint8)
    Image.fromarray(toyworld.PALETTE[classes]).save(tmp_path / "map.png")
    colours = read_annotation(tmp_path / "map.png", 32, None).reshape(-1, 3)
    assert {tuple(c) for c in colours} <= {tuple(c) for c in toyworld.PALETTE}, "no blended colours"


def _progress(path):
    try:
        return path.read_text().count("\n") - 1  # committed blocks (the first line is the header)
    except FileNotFoundError:
        return 0


# tokenize_data.py's command line with every batch slowed down, so that a test has time to kill it mid-run
SLOW_TOKENIZE = """import sys, time
import tokenize_data
encode = tokenize_data.encode
tokenize_data.encode = lambda model, pixels: (time.sleep(0.15), encode(model, pixels))[1]
tokenize_data.main(sys.argv[1:])"""


@pytest.mark.tokenizer
def test_kill_9_mid_run_then_rerun_gives_the_same_files_as_an_uninterrupted_run(tmp_path, ckpt, capsys):
    rng = np.random.default_rng(1)
    (tmp_path / "in").mkdir()
    for i in range(40):
        random_image(rng, 32, 40).save(tmp_path / "in" / f"{i:03d}.png")
    (tmp_path / "in" / "zz_bad.png").write_bytes(b"")
    args = ["images", "--input", tmp_path / "in", "--vqgan", ckpt, "--name", "d", "--block", 8, "--batch_size", 4,
            "--num_workers", 1, "--device", "cpu"]
    args = [str(a) for a in args]
    log = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_TOKENIZE, *args, "--out", str(tmp_path / "killed")], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=log)
    progress, partial = tmp_path / "killed" / "d.progress", tmp_path / "killed" / "d.tokens.partial"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # kill inside block 3: written rows not yet committed
        blocks = _progress(progress)
        if blocks >= 4 or (blocks >= 2 and partial.exists() and partial.stat().st_size > 2 * 8 * blocks * S):
            break
        time.sleep(0.01)
    if proc.poll() is not None:  # it ended on its own: say why
        raise_unfinished(subprocess.CompletedProcess(args, proc.returncode, "", (tmp_path / "stderr.txt").read_text()))
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its decoding worker
    assert proc.wait() == -signal.SIGKILL
    assert not (tmp_path / "killed" / "d.json").exists() and partial.stat().st_size > 0
    td.main(args + ["--out", str(tmp_path / "killed")])  # the same command again
    assert "resuming after" in capsys.readouterr().err
    td.main(args + ["--out", str(tmp_path / "straight")])
    for suffix in (".tokens", ".json"):
        assert (tmp_path / "killed" / f"d{suffix}").read_bytes() == (tmp_path / "straight" / f"d{suffix}").read_bytes()
    assert not progress.exists() and not partial.exists()
    capsys.readouterr()
    td.main(args + ["--out", str(tmp_path / "straight")])
    assert "up to date" in capsys.readouterr().out


def test_a_progress_line_cut_by_a_kill_is_not_a_commit(tmp_path):
    path = tmp_path / "d.progress"
    path.write_text('{"fingerprint": "f"}\n{"block": 0, "rows": 8}\n{"block": 1, "ro')
    assert td._read_progress(path, "f") == [{"block": 0, "rows": 8}]
    assert td._read_progress(path, "another job") == []


@pytest.mark.tokenizer
def test_shards_merge_into_the_file_of_one_run(tmp_path, ckpt):
    rng = np.random.default_rng(2)
    for v in range(5):  # frame folders of different lengths, one with a broken frame
        (tmp_path / "in" / f"v{v}").mkdir(parents=True)
        for t in range(3 + v):
            random_image(rng, 32, 32).save(tmp_path / "in" / f"v{v}" / f"{t}.png")
    (tmp_path / "in" / "v3" / "2.png").write_bytes(b"broken")
    base = ["video", "--input", str(tmp_path / "in"), "--vqgan", str(ckpt), "--name", "vid", "--block", "2",
            "--device", "cpu", "--num_workers", "0"]
    td.main(base + ["--out", str(tmp_path / "one")])
    for i in range(3):
        td.main(base + ["--out", str(tmp_path / "sharded"), "--num_shards", "3", "--shard_id", str(i)])
    td.main(["merge", "--out", str(tmp_path / "sharded"), "--name", "vid"])
    for suffix in (".tokens", ".json"):
        assert (tmp_path / "one" / f"vid{suffix}").read_bytes() == (tmp_path / "sharded" / f"vid{suffix}").read_bytes()
    meta = load_tokens(tmp_path / "one" / "vid").meta
    assert meta["groups"] == [[0, 3], [3, 4], [7, 5], [12, 7]]
    assert [Path(s["path"]).name for s in meta["skipped"]] == ["v3"] and "frame 2.png" in meta["skipped"][0]["reason"]


@pytest.mark.tokenizer
def test_video_files_and_frame_folders_with_a_stride(tmp_path, ckpt):
    import av
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)] * 2
    with av.open(str(tmp_path / "clip.mp4"), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for c in colours:
            frame = av.VideoFrame.from_ndarray(np.full((32, 48, 3), c, np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    (tmp_path / "corrupt.mp4").write_bytes(os.urandom(3000))
    (tmp_path / "frames").mkdir()
    for t in range(11):  # natural order: 2.png before 10.png
        Image.new("RGB", (32, 32), (t * 20, 0, 0)).save(tmp_path / "frames" / f"{t}.png")
    units = td.list_videos([str(tmp_path)])
    assert [u[0] for u in units] == ["video", "video", "frames"]
    opts = {"size": 32, "stride": 2, "max_frames": 100}
    decoded = td.load_unit(units[0], opts)  # decoded here first: a forked worker would then hang in FFmpeg
    assert len(decoded) == 6 and all(np.abs(f.astype(int) - c).mean() < 20 for f, c in zip(decoded, colours[::2]))
    assert [f[0, 0, 0] for f in td.load_unit(units[2], opts)] == [0, 40, 80, 120, 160, 200]
    td.main(["video", "--input", str(tmp_path), "--stride", "2", "--vqgan", str(ckpt), "--out",
             str(tmp_path / "out"), "--name", "v", "--device", "cpu", "--num_workers", "1"])
    meta = load_tokens(tmp_path / "out" / "v").meta
    assert meta["kind"] == "video" and meta["groups"] == [[0, 6], [6, 6]] and meta["stride"] == 2
    assert [Path(s["path"]).name for s in meta["skipped"]] == ["corrupt.mp4"]


def test_palettes_follow_the_reference():
    ade, city = PALETTES["ade20k"], PALETTES["cityscapes"]
    assert ade.shape == (150, 3) and len({tuple(c) for c in ade}) == 150
    assert tuple(ade[0]) == (255, 255, 255) and tuple(ade[7]) == (255, 255 - 42, 255 - 42)
    assert tuple(ade[149]) == (255 - 4 * 42, 255, 255 - 5 * 42)
    assert city.shape == (19, 3) and tuple(city[0]) == (128, 64, 128) and tuple(city[18]) == (119, 11, 32)
    assert PALETTES["toy"].shape == (len(toyworld.CLASSES), 3)


def test_ade20k_layout_pairs_by_stem_and_colours_class_indices(tmp_path):
    images, annotations = tmp_path / "images" / "training", tmp_path / "annotations" / "training"
    images.mkdir(parents=True)
    annotations.mkdir(parents=True)
    index = np.zeros((40, 40), np.uint8)
    index[:, 20:], index[20:, :20] = 150, 1  # right: class 149, bottom left: class 0, top left: unlabeled
    for i in (1, 2):
        Image.new("RGB", (40, 40), "gray").save(images / f"ADE_train_0000000{i}.jpg")
    Image.fromarray(index).save(annotations / "ADE_train_00000001.png")
    units = td.list_pairs(str(images), str(annotations))
    assert units[0] == ("pair", str(images / "ADE_train_00000001.jpg"), str(annotations / "ADE_train_00000001.png"))
    assert units[1][0] == "skip" and "no annotation" in units[1][2]
    loader = td.Loader([units], {"size": 32, "palette": PALETTES["ade20k"].tolist(), "palette_name": "ade20k"})
    pixels, rows, skipped = loader[0]
    assert rows == [2, 0] and len(skipped) == 1
    seg = pixels[1]
    assert (seg[:, 17:] == PALETTES["ade20k"][149]).all() and (seg[17:, :15] == PALETTES["ade20k"][0]).all()
    assert (seg[:15, :15] == 0).all()


def test_cityscapes_layout_prefers_label_ids_and_maps_them_to_train_ids(tmp_path):
    images, gt = tmp_path / "leftImg8bit" / "train" / "aachen", tmp_path / "gtFine" / "train" / "aachen"
    images.mkdir(parents=True)
    gt.mkdir(parents=True)
    stem = "aachen_000000_000019"
    Image.new("RGB", (64, 32), "gray").save(images / f"{stem}_leftImg8bit.png")
    label_ids = np.full((32, 64), 7, np.uint8)  # road
    label_ids[:, 32:] = 26  # car
    label_ids[:4] = 1  # ego vehicle: not one of the 19 classes
    Image.fromarray(label_ids).save(gt / f"{stem}_gtFine_labelIds.png")
    Image.new("RGB", (64, 32), (1, 2, 3)).save(gt / f"{stem}_gtFine_color.png")
    Image.fromarray(label_ids).save(gt / f"{stem}_gtFine_instanceIds.png")
    (gt / f"{stem}_gtFine_polygons.json").write_text("{}")
    units = td.list_pairs(str(tmp_path / "leftImg8bit" / "train"), str(tmp_path / "gtFine" / "train"))
    assert units == [("pair", str(images / f"{stem}_leftImg8bit.png"), str(gt / f"{stem}_gtFine_labelIds.png"))]
    city = PALETTES["cityscapes"]
    opts = {"size": 32, "palette": city.tolist(), "palette_name": "cityscapes"}
    seg = td.Loader([units], opts)[0][0][1]  # centre crop of 64x32: columns 16..47
    assert (seg[4:, :16] == city[0]).all() and (seg[4:, 16:] == city[13]).all() and (seg[:4] == 0).all()


@pytest.mark.tokenizer
@pytest.mark.data
def test_toy_world_is_tokenized_into_every_kind_and_its_sequences_pictured(tmp_path, ckpt):
    toyworld.generate(tmp_path / "world", seed=0, workers=1, num_images=10, num_val_images=4, num_videos=2,
                      num_val_videos=1, frames=16)
    td.main(["toyworld", "--root", str(tmp_path / "world"), "--vqgan", str(ckpt), "--out", str(tmp_path / "tok"),
             "--device", "cpu", "--num_workers", "0"])
    rng = np.random.default_rng(0)
    for split, n, v in (("train", 10, 2), ("val", 4, 1)):
        assert load_tokens(tmp_path / "tok" / f"{split}_images").meta["num_images"] == n
        video = load_tokens(tmp_path / "tok" / f"{split}_video")
        assert video.meta["groups"] == [[16 * i, 16] for i in range(v)]
        assert natural_sequence(video, rng).shape == (16 * S,)
        for ann in (*toyworld.TASKS, "recoloured"):
            pairs = load_tokens(tmp_path / "tok" / f"{split}_{ann}")
            assert (pairs.meta["kind"], pairs.meta["annotation"], pairs.meta["num_images"]) == ("pairs", ann, 2 * n)
            assert generative_sequence(pairs, rng, n_pairs=2).shape == (4 * S,)
        group = 2 * toyworld.GROUP[split]  # recoloured pairs: one group per palette
        assert load_tokens(tmp_path / "tok" / f"{split}_recoloured").meta["groups"] == \
            [[first, min(group, 2 * n - first)] for first in range(0, 2 * n, group)]
    assert load_tokens(tmp_path / "tok" / "train_segmentation").meta["palette"] == toyworld.PALETTE.tolist()
    td.main(["show", "--data", str(tmp_path / "tok"), "--names", "train_*", "--vqgan", str(ckpt),
             "--out", str(tmp_path / "seq.png"), "--n_images", "4", "--device", "cpu"])
    # rows: images (single, random), video (natural), 6 pair files (discriminative, generative)
    assert Image.open(tmp_path / "seq.png").size[1] == 15 * (2 * 32 + 2)


@pytest.mark.tokenizer
def test_a_full_disk_stops_with_one_line_and_the_same_command_then_finishes(tmp_path, ckpt):
    # a real failed write: a file-size limit in the process (tests/faulty.py), so the tokens file stops growing at
    # 3000 bytes (EFBIG, as on a full disk), inside block 3 of 8-image blocks of 128 bytes per image
    rng = np.random.default_rng(2)
    (tmp_path / "in").mkdir()
    for i in range(40):
        random_image(rng, 32, 32).save(tmp_path / "in" / f"{i:03d}.png")
    args = ["images", "--input", tmp_path / "in", "--vqgan", ckpt, "--name", "d", "--block", 8, "--batch_size", 4,
            "--num_workers", 0, "--device", "cpu"]
    full = raise_unfinished(subprocess.run(
        [sys.executable, "tests/faulty.py", *map(str, args), "--out", str(tmp_path / "full")], cwd=ROOT,
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "FAULT_SCRIPT": "tokenize_data.py", "FAULT_FSIZE": "3000"}))
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert full.stderr.strip().splitlines()[-1] == (
        f"error: could not write {tmp_path / 'full' / 'd'}.tokens (File too large); free disk space, then run the "
        "same command again: it goes on after the last finished block")
    assert not (tmp_path / "full" / "d.tokens").exists() and _progress(tmp_path / "full" / "d.progress") == 2
    again = cli(*args, "--out", tmp_path / "full")
    assert again.returncode == 0 and "resuming after 2 of 5 blocks" in again.stderr, again.stderr[-3000:]
    assert cli(*args, "--out", tmp_path / "straight").returncode == 0
    for suffix in (".tokens", ".json"):
        assert (tmp_path / "full" / f"d{suffix}").read_bytes() == (tmp_path / "straight" / f"d{suffix}").read_bytes()
