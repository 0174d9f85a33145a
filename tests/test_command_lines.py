"""Every command line refuses bad input the same way: a non-zero exit, one line that says what is wrong (after
argparse's usage lines, where argparse says it), no traceback, and nothing written: the folder it ran in, its
inputs and its output paths are as they were.

The scripts run in this process, as `python SCRIPT.py ARGS` runs them (their `if __name__ == "__main__":` block
included, so a script's own `error: ...` exit is what is tested): a new interpreter per case would cost a second
or two each. One case runs as a real process too, to show the two agree. No case may start a process: one that
did would be a script starting work it should have refused."""
import contextlib
import io
import json
import re
import runpy
import subprocess
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import vqgan
from infra import vqgan_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the command is valid and starts work")
# what may come before the one line of error: argparse's usage (a line, and its indented continuations)
# and progress bars (tqdm)
USAGE = re.compile(r"usage: |\s")
PROGRESS = re.compile(r".*\d+%\|.*\| \d+/\d+ \[")


def run_in_process(script, args):
    """(exit code, stdout, stderr) of `python SCRIPT ARGS`, run here: a SystemExit's message goes to stderr with
    exit code 1 and any other exception prints its traceback, as the interpreter would."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        sys.argv = [script, *map(str, args)]
        try:
            runpy.run_path(str(ROOT / script), run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except Exception:
            traceback.print_exc()
            code = 1
    return code, out.getvalue(), err.getvalue()


def tree(folder):
    """{path: bytes (None for a folder)} of everything under folder."""
    return {p: None if p.is_dir() else p.read_bytes() for p in sorted(Path(folder).rglob("*"))}


def assert_refused(code, err, says):
    assert code != 0 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS.match(line)]
    if lines and lines[0].startswith("usage: "):  # argparse: usage, then "PROG: error: ..."
        assert all(USAGE.match(line) for line in lines[:-1]) and ": error: " in lines[-1], err
        lines = lines[-1:]
    assert len(lines) == 1 and says in lines[0], err


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two small random VQ-GAN checkpoints (32x32 pixels -> 8x8 codes): one of 256 codes, one whose codebook is
    too big for uint16 token files."""
    folder = tmp_path_factory.mktemp("vqgan")
    config = dict(vqgan.CONFIGS["toy"], hidden_channels=32, channel_mult=[1, 1, 1], z_channels=32,
                  num_embeddings=256, quantized_embed_dim=8)
    torch.manual_seed(0)
    vqgan_checkpoint.save_pretrained(vqgan.VQGAN(config), folder / "tiny")
    vqgan_checkpoint.save_pretrained(vqgan.VQGAN(dict(config, num_embeddings=65537, quantized_embed_dim=2)), folder / "huge")
    return folder


def write_token_file(prefix, tokens_per_image, rows=2, write_tokens=True, **meta):
    if write_tokens:
        np.zeros((rows, tokens_per_image), np.uint16).tofile(f"{prefix}.tokens")
    meta = dict(kind="images", tokens_per_image=tokens_per_image, num_images=rows, image_size=32, vocab_size=256,
                groups=[[0, rows]], skipped=[], tokenizer={}, fingerprint="f", **meta)
    Path(f"{prefix}.json").write_text(json.dumps(meta))


@pytest.fixture
def refuses(tmp_path, checkpoints, monkeypatch):
    """refuses.run(script, args, says): run `python script args` in an empty folder of its own; it must be refused
    with one line holding `says`, and write nothing. In args, {name} is the path of an input made here ({empty},
    {images}, ...), of a VQ-GAN checkpoint ({ckpt}, {huge}), of nothing ({nowhere}) or of an output ({out})."""
    work, inp = tmp_path / "work", tmp_path / "inputs"
    for folder in ("empty", "images", "notes", "broken", "other_stems", "tokens", "foreign", "shards"):
        (inp / folder).mkdir(parents=True)
    Image.new("RGB", (40, 40), "gray").save(inp / "images" / "a.png")
    (inp / "images" / "clip.mp4").write_bytes(b"")  # only its name is read before the refusal
    (inp / "notes" / "notes.txt").write_text("not an image")
    (inp / "broken" / "a.png").write_bytes(b"not a png")
    Image.new("RGB", (40, 40), "black").save(inp / "other_stems" / "b.png")
    write_token_file(inp / "tokens" / "d", tokens_per_image=64)
    write_token_file(inp / "foreign" / "d", tokens_per_image=16)  # 4x4 codes: another tokenizer's
    write_token_file(inp / "shards" / "one-00000-of-00002", 4, shard=[0, 2], job="j")  # its shard 1 never ran
    for i in range(2):  # shard 1's tokens are missing
        write_token_file(inp / "shards" / f"two-{i:05d}-of-00002", 4, write_tokens=i == 0, shard=[i, 2], job="j")
    paths = {p.name: p for p in inp.iterdir()} | dict(nowhere=tmp_path / "nowhere", out=work / "out",
                                                      ckpt=checkpoints / "tiny", huge=checkpoints / "huge")
    work.mkdir()
    monkeypatch.chdir(work)  # default output folders land here
    monkeypatch.syspath_prepend(str(ROOT))  # what a script imports late is still found
    monkeypatch.setattr(sys, "argv", list(sys.argv))

    def run(script, args, says):
        before = tree(tmp_path)
        with monkeypatch.context() as m:
            m.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail(f"{script} started a process: {a}"))
            code, _, err = run_in_process(script, [a.format(**paths) for a in args.split()])
        assert_refused(code, err, says)
        assert tree(tmp_path) == before, "a refused command wrote something"
        return err
    return SimpleNamespace(run=run, paths=paths)


RUNNABLE = "--vqgan {ckpt} --device cpu --num_workers 0 --out {out}"  # the rest of a job that runs on good input


@pytest.mark.parametrize("args, says", [
    ("images --input {nowhere} --name d", "input '"),  # ... does not exist
    ("images --input {empty} --name d", "no inputs found for d in"),
    ("images --input {notes} --name d", "(1 skipped, e.g. "),  # no image among its files
    ("images --input {broken} --name d " + RUNNABLE, "none of the 1 inputs of d could be read, e.g. "),  # a.png
    ("images --input {images} --name d --out {out}", "pass --vqgan CKPT"),
    ("images --input {images} --name d --vqgan_config f8 --out {out}", "--vqgan_config must be one of"),
    ("images --input {images} --name d --vqgan {nowhere} --out {out}", "does not exist; pass a directory"),
    ("images --input {images} --name d --vqgan {images} --out {out}", "is not a VQGAN checkpoint"),
    ("images --input {images} --name d --vqgan {huge} --device cpu --out {out}", "does not fit uint16 token files"),
    ("pairs --images {images} --annotations {other_stems} --name d " + RUNNABLE, "no annotation with the stem 'a'"),
    ("pairs --images {images} --annotations {other_stems} --name d --palette ade21k", "palette 'ade21k' is not"),
    ("images --input {images} --name d --num_shards 0", "--num_shards: must be at least 1, got 0"),
    ("images --input {images} --name d --num_shards 2 --shard_id 2", "--shard_id must be in [0, --num_shards)"),
    ("images --input {images} --name d --batch_size 0", "--batch_size: must be at least 1"),
    ("images --input {images} --name d --num_workers -1", "--num_workers: must be at least 0"),
    ("images --input {images} --name d --block two", "--block: invalid int value: 'two'"),
    ("images --input {images} --name d " + RUNNABLE.replace("{out}", "{images}/a.png"), "a.png is a file: give"),
    ("images --input {images} --name d --device gpu", "--device gpu: not a device"),
    pytest.param("images --input {images} --name d --device cuda", "this machine has no CUDA GPU", marks=NO_GPU),
    ("video --input {images} --name d --stride 0", "--stride: must be at least 1"),
    ("toyworld --root {empty} --vqgan {ckpt}", "is not a toy world (no meta.json): run python toy/toyworld.py"),
    ("merge --out {empty} --name d", "no shards d-*-of-*.json in"),
    ("merge --out {shards} --name one", "need all 2 shards of one job to merge, found: one-00000-of-00002"),
    ("merge --out {shards} --name two", "shards two-00001-of-00002 have no complete .tokens file"),
    ("show --data {empty} --vqgan {ckpt} --device cpu --out {out}/seq.png", "no token files *.json in"),
    ("show --data {foreign} --vqgan {ckpt} --device cpu --out {out}/seq.png", "d was tokenized by another VQ-GAN"),
    ("show --data {tokens} --device cpu --out {out}/seq.png", "pass --vqgan CKPT"),
    ("shards --out {out}", "invalid choice: 'shards'"),
])
def test_tokenize_data_refuses_bad_input_with_one_line_and_writes_nothing(refuses, args, says):
    refuses.run("tokenize_data.py", args, says)


def test_tokenize_data_without_pyav_says_how_to_read_videos(refuses, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` fails, as where PyAV is not installed
    refuses.run("tokenize_data.py", "video --input {images} --name d " + RUNNABLE, "needs PyAV: `pip install av`")


def test_a_refusal_in_a_new_process_is_the_same_as_in_this_one(refuses):
    """The in-process runner above reproduces the interpreter: same exit code, same stderr."""
    args = ["images", "--input", str(refuses.paths["notes"]), "--name", "d"]
    real = subprocess.run([sys.executable, "tokenize_data.py", *args], cwd=ROOT, capture_output=True, text=True)
    assert (real.returncode, real.stderr) == run_in_process("tokenize_data.py", args)[::2]


@pytest.mark.parametrize("args, says", [
    ("--size 16", "--size must be at least 32 pixels"),
    ("--out {images}", "exists and is not a toy world; choose another --out"),
    ("--num_images -1", "--num_images must be at least 0, got -1"),
    ("--frames 0", "--frames must be at least 1, got 0"),
    ("--workers 0", "--workers must be at least 1, got 0"),
    ("--seed one", "--seed: invalid int value: 'one'"),
])
def test_toyworld_refuses_bad_input_with_one_line_and_writes_nothing(refuses, args, says):
    refuses.run("toy/toyworld.py", args, says)


@pytest.mark.parametrize("args, says", [
    ("decoders --out {out}", "argument assignment: invalid choice: 'decoders'"),
    ("--check everything", "argument --check: invalid choice: 'everything'"),
    ("data", "give --out, the folder for the student copy"),
    ("data --out {images}", "exists: choose a new --out"),
    ("data --check data", "--check NAME grades a copy of its own"),
    ("--check data --out {out}", "--check NAME grades a copy of its own"),
    ("--out {out}", "--out is the folder of a student copy: name its assignment"),
])
def test_course_refuses_bad_input_with_one_line_and_writes_nothing(refuses, args, says):
    refuses.run("course/course.py", args, says)


@pytest.mark.parametrize("args, says", [
    ("--size 5T", "argument --size: invalid choice: '5T'"),
    ("--size", "argument --size: expected one argument"),
])
def test_model_size_report_refuses_bad_input_with_one_line(refuses, args, says):
    refuses.run("model.py", args, says)


@pytest.mark.parametrize("args, says", [
    ("--profile tpu", "argument --profile: invalid choice: 'tpu'"),
    ("--ablation table7", "argument --ablation: invalid choice: 'table7'"),
    ("--quick --out", "argument --out: expected one argument"),
    pytest.param("--profile gpu --out {out}", "--profile gpu needs a CUDA GPU; use --profile cpu", marks=NO_GPU),
    ("--quick --profile cpu --out {out}", "drop one of --quick and --profile cpu"),
    ("--quick --out {images}/a.png", "a.png is a file; pass a folder"),
    ("--quick --out {out} --docs {images}/a.png", "a.png is a file; pass a folder"),
])
def test_run_toy_refuses_bad_input_before_any_work_with_one_line(refuses, args, says):
    refuses.run("run_toy.py", args, says)
