"""The whole method end to end on the toy world (toy world -> VQ-GAN -> tokens -> stage 1 -> stage 2 -> evaluation):
a `run_toy.py --quick` run killed inside stage 2 resumes it and ends with the tables of an unbroken run; and, marked
`slow` (minutes; `python -m pytest -q -m slow`, which CI runs too), `run_toy.py --profile ci`, the demo scaled down to
about two minutes, must still learn in context, so a change that breaks in-context learning breaks CI, and the
studies (at --quick budgets, on its models) write their tables and pictures."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import raise_unfinished

ROOT = Path(__file__).resolve().parents[1]
# every test here runs the whole pipeline: each course assignment's code is on its path
pytestmark = [pytest.mark.decoder, pytest.mark.tokenizer, pytest.mark.data, pytest.mark.inference]
MODEL = "stage 1 + stage 2 (LVM-Lite)"


def run_toy(out, profile="--profile=ci"):
    return [sys.executable, "run_toy.py", profile, "--out", str(out)]


def tables(out):
    """results.md without its wall-time line."""
    return [line for line in (out / "results.md").read_text().splitlines() if "wall time" not in line]


def copy_steps(run, out, steps=("world", "vqgan", "tokens", "stage1")):
    """A run's finished steps, as a new run in out would find them."""
    for done in steps:
        shutil.copytree(run / done, out / done)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("ci") / "toy"
    result = raise_unfinished(subprocess.run(run_toy(out), cwd=ROOT, capture_output=True, text=True))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_scaled_down_demo_learns_in_context_well_above_its_baselines(demo):
    results = json.loads((demo / "results.json").read_text())
    rows = {r["model"]: r for r in results["rows"]}
    miou = rows[MODEL]["seg_miou"]
    # one prompt pair makes the model segment: far above answering "background" and above stage 1 alone
    assert miou > rows["background everywhere (class 0)"]["seg_miou"] + 30, rows
    assert miou > rows["stage 1 only"]["seg_miou"] + 30, rows
    # the prompt chooses the task: each of the five is identified far more often than a guess among five
    identified = results["results"][MODEL]["tasks"]["identified"]
    assert all(share > 50 for share in identified.values()), identified
    # the video continues: well above repeating the last frame
    assert rows[MODEL]["video_psnr"] > rows["repeat the last prompt frame"]["video_psnr"] + 3, rows
    for r in results["results"].values():
        for protocol in ("segmentation", "video", "generation"):
            assert Path(r[protocol]["grid"]).stat().st_size > 0


def test_run_killed_inside_stage_2_resumes_it_and_ends_with_the_same_tables(tmp_path, run_script):
    """At --quick budgets: one run killed with -9 once stage 2 has saved a checkpoint, then run again, against an
    unbroken run from the same finished steps before stage 2."""
    killed, unbroken = tmp_path / "killed", tmp_path / "unbroken"
    with open(tmp_path / "killed.log", "w") as log:
        run = subprocess.Popen(run_toy(killed, "--quick"), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
        deadline = time.time() + 300
        while not (killed / "stage2" / "ckpt.pt").exists() and run.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)  # the whole run, stage 2's trainer included, mid-stage
        run.wait()
    # a run that ended by itself before stage 2's first checkpoint failed: say why
    raise_unfinished(subprocess.CompletedProcess(run.args, run.returncode or 1, (tmp_path / "killed.log").read_text()))
    assert run.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert (killed / "stage2" / "ckpt.pt").exists() and not (killed / "stage2" / ".done").exists()
    copy_steps(killed, unbroken)  # the steps it finished before stage 2
    run_script(run_toy(unbroken, "--quick"), cwd=ROOT)
    printed = run_script(run_toy(killed, "--quick"), cwd=ROOT).stdout
    assert "--resume" in printed and printed.count("done already") == 4
    assert tables(killed) == tables(unbroken)


@pytest.mark.slow
def test_each_study_writes_its_table_and_pictures_and_docs_gets_copies(demo, tmp_path, run_script):
    """The studies at --quick budgets, on the demo's world and models: each trains only its own variants."""
    out = tmp_path / "toy"
    copy_steps(demo, out, ("world", "vqgan", "tokens", "stage1", "stage2"))
    # the studies reuse what the demo trained; each writes its table and pictures, and --docs copies them
    docs = tmp_path / "docs"
    for study, picture in (("sampling", "toy_sampling.png"), ("long-video", "toy_long_video_frames.png"),
                           ("mapping", "toy_mapping_curve.png")):
        printed = run_script([sys.executable, "run_toy.py", "--quick", "--out", str(out), "--ablation", study,
                              "--docs", str(docs)], cwd=ROOT).stdout
        assert "done already" in printed and (docs / picture).stat().st_size > 0
        assert (docs / f"toy_results-{study}.md").read_text() == (out / f"results-{study}.md").read_text()
    tables = {s: (out / f"results-{s}.md").read_text() for s in ("sampling", "long-video", "mapping")}
    assert "| temperature | 0.1 | 0.4 | 0.7 | 1.0 |" in tables["sampling"]
    assert "continued from 5 frames to 64" in tables["long-video"]
    assert "| prompt pairs | 1 | 2 | 4 | 7 |" in tables["mapping"]
    mapping = json.loads((out / "results-mapping.json").read_text())["results"]
    assert len(mapping["learning"]["miou"]) == 4 and mapping["learning"]["oracle"] > 50
