"""The whole method end to end: `run_toy.py --quick` (toy world -> VQ-GAN -> tokens -> stage 1 -> stage 2 ->
evaluation) on tiny budgets. Slow for a unit test (a few minutes), and the one that shows the pieces fit."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_pipeline_produces_tables_pictures_and_a_better_sequence_model(tmp_path):
    out = tmp_path / "toy"
    subprocess.run([sys.executable, "run_toy.py", "--quick", "--out", str(out)], cwd=ROOT, check=True)
    tables = (out / "results.md").read_text()
    assert "| stage 1 + stage 2 (LVM-Lite) |" in tables and "| stage 1 only |" in tables
    results = json.loads((out / "results.json").read_text())
    rows = {r["model"]: r for r in results["rows"]}
    for r in results["results"].values():
        for protocol in ("segmentation", "video", "generation"):
            picture = Path(r[protocol]["grid"])
            assert picture.is_file() and picture.stat().st_size > 0
    # fine-tuning on sequences is what stage 2 is for: its held-out loss on 16-image sequences must be lower
    assert rows["stage 1 + stage 2 (LVM-Lite)"]["seq_loss"] < rows["stage 1 only"]["seq_loss"]
    # an interrupted or repeated run resumes: every step is found done and only evaluation runs again
    rerun = subprocess.run([sys.executable, "run_toy.py", "--quick", "--out", str(out)], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout
    assert rerun.count("done already") == 5
