"""The whole method end to end: `run_toy.py --quick` (toy world -> VQ-GAN -> tokens -> stage 1 -> stage 2 ->
evaluation) on tiny budgets. Slow for a unit test (a few minutes), and the one that shows the pieces fit."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.decoder
@pytest.mark.tokenizer
@pytest.mark.data
@pytest.mark.inference
def test_quick_pipeline_produces_tables_pictures_and_a_better_sequence_model(tmp_path, run_script):
    out = tmp_path / "toy"
    run_script([sys.executable, "run_toy.py", "--quick", "--out", str(out)], cwd=ROOT)
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
    rerun = run_script([sys.executable, "run_toy.py", "--quick", "--out", str(out)], cwd=ROOT).stdout
    assert rerun.count("done already") == 5
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
