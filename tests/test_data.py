"""Token files and the sequences of the paper built from them (data.py)."""
import json
from pathlib import Path

import numpy as np
import pytest

import data


def write_token_file(prefix, kind, groups, n_rows):
    """A token file by the contract, row r filled with the value r."""
    np.repeat(np.arange(n_rows, dtype=np.uint16)[:, None], 4, 1).tofile(f"{prefix}.tokens")
    meta = dict(kind=kind, tokens_per_image=4, num_images=n_rows, image_size=32, vocab_size=512, groups=groups,
                sources=[], skipped=[], tokenizer={})
    Path(f"{prefix}.json").write_text(json.dumps(meta))
    return data.load_tokens(prefix)


def _rows(seq):
    assert seq.dtype == np.int64
    return seq.reshape(-1, 4)[:, 0]


@pytest.mark.data
def test_sequence_builders_make_the_sequences_of_the_paper(tmp_path):
    video = write_token_file(tmp_path / "video", "video", [[0, 20], [20, 5], [25, 30]], 55)
    pairs = write_token_file(tmp_path / "pairs", "pairs", [[0, 20], [20, 40]], 60)
    rng = np.random.default_rng(0)
    for _ in range(50):
        frames = _rows(data.natural_sequence(video, rng, n_images=16))  # 16 consecutive frames of one video
        assert len(frames) == 16 and (np.diff(frames) == 1).all() and (frames[0] <= 4 or 25 <= frames[0] <= 39)
        d = _rows(data.discriminative_sequence(pairs, rng)).reshape(8, 2)  # "image, annotation" x 8, one dataset
        assert (d[:, 0] % 2 == 0).all() and (d[:, 1] == d[:, 0] + 1).all()
        assert (d < 20).all() or (d >= 20).all()
        g = _rows(data.generative_sequence(pairs, rng, n_pairs=4)).reshape(4, 2)  # "annotation, image"
        assert (g[:, 1] % 2 == 0).all() and (g[:, 0] == g[:, 1] + 1).all()
        assert len(set(_rows(data.random_sequence(video, 1, seed=0, n_images=16)))) == 16
        assert data.single_images(video, 7, 3, seed=0).shape == (3, 4)
    assert len(set(d[:, 0])) == 8, "pairs of a sequence are distinct when the dataset is big enough"
    same = [data.SEQUENCE_BUILDERS["discriminative"](pairs, np.random.default_rng(7)) for _ in range(2)]
    assert np.array_equal(*same), "deterministic given the generator"


@pytest.mark.data
def test_draws_are_uniform_over_images_windows_and_pairs(tmp_path):
    """Every image, every 16-frame window (not every video) and every pair (so a dataset in proportion to its
    size) is equally likely."""
    video = write_token_file(tmp_path / "video", "video", [[0, 20], [20, 5], [25, 30]], 55)  # windows 5, 0, 15
    pairs = write_token_file(tmp_path / "pairs", "pairs", [[0, 20], [20, 40]], 60)  # 10 and 20 pairs
    images = write_token_file(tmp_path / "images", "images", [[0, 5]], 5)
    rng, n = np.random.default_rng(0), 4000
    first = np.array([_rows(data.natural_sequence(video, rng))[0] for _ in range(n)])
    assert abs((first < 20).mean() - 5 / 20) < 0.03 and len(np.unique(first)) == 20
    in_first = np.array([_rows(data.discriminative_sequence(pairs, rng, n_pairs=1))[0] < 20 for _ in range(n)])
    assert abs(in_first.mean() - 1 / 3) < 0.03


@pytest.mark.data
def test_single_images_come_once_per_epoch_in_a_new_order_each_epoch(tmp_path):
    """Stage 1's stream: positions 0..N-1 show every image once (the last too), the next N again, in another
    order; the same position and seed always give the same image, another seed another order."""
    images = write_token_file(tmp_path / "images", "images", [[0, 50]], 50)
    stream = _rows(data.single_images(images, 0, 200, seed=3)).tolist()
    epochs = np.array(stream).reshape(4, 50)
    assert all(sorted(e) == list(range(50)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 4 and epochs[0].tolist() != list(range(50))
    for first, count in ((70, 1), (3, 30), (45, 60)):  # any slice, across epochs too, is the same stream
        assert _rows(data.single_images(images, first, count, seed=3)).tolist() == stream[first:first + count]
    assert _rows(data.single_images(images, 0, 50, seed=4)).tolist() != stream[:50]
    # LVM's random sequences are n consecutive images of that stream
    r = _rows(data.random_sequence(images, 3, seed=3, n_images=16))
    assert r.tolist() == stream[48:64]


@pytest.mark.data
def test_builders_refuse_the_wrong_kind_of_file_and_too_long_sequences(tmp_path):
    """A ValueError about what is wrong (the file's kind; the length asked), whatever its wording."""
    video = write_token_file(tmp_path / "video", "video", [[0, 20], [20, 5]], 25)
    pairs = write_token_file(tmp_path / "pairs", "pairs", [[0, 20]], 20)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="(?i)video"):
        data.natural_sequence(pairs, rng)
    for build in (data.discriminative_sequence, data.generative_sequence):
        with pytest.raises(ValueError, match="(?i)pair"):
            build(video, rng)
    with pytest.raises(ValueError, match="(?i)21|long|short|frame|image"):
        data.natural_sequence(video, rng, n_images=21)  # the longest video has 20 frames


@pytest.mark.data
def test_pairs_and_images_repeat_only_when_there_are_too_few(tmp_path):
    """n_pairs / n_images of every size: distinct while the data has enough, repeated when it has fewer."""
    pairs = write_token_file(tmp_path / "pairs", "pairs", [[0, 20]], 20)  # 10 pairs
    images = write_token_file(tmp_path / "images", "images", [[0, 6]], 6)
    rng = np.random.default_rng(0)
    for n in (1, 10, 13):
        d = _rows(data.discriminative_sequence(pairs, rng, n_pairs=n)).reshape(n, 2)
        assert (d[:, 0] % 2 == 0).all() and (d[:, 1] == d[:, 0] + 1).all()
        assert len(set(d[:, 0])) == n or n > 10
        r = _rows(data.random_sequence(images, 0, seed=0, n_images=n))  # the first images of an epoch
        assert len(r) == n and (len(set(r)) == n or n > 6)


def test_load_tokens_refuses_an_unfinished_file(tmp_path):
    write_token_file(tmp_path / "d", "images", [[0, 10]], 10)
    with open(tmp_path / "d.tokens", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="rerun the tokenize command"):
        data.load_tokens(tmp_path / "d")
