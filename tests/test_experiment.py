"""The closed-loop experiment's report (sim/experiment.py): Wilson intervals, records, layout.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_experiment.py -q
"""

from __future__ import annotations

import json

import pytest

from pipeline.errors import RynnError
from sim.experiment import read_episodes, write_report


def test_report_from_the_experiment_layout(tmp_path):
    full = tmp_path / "rollouts" / "full"
    full.mkdir(parents=True)
    (full / "episodes.jsonl").write_text("".join(
        json.dumps({"seed": s, "success": s % 2 == 0, "steps": 40}) + "\n" for s in range(10)))
    (full / "summary.json").write_text(json.dumps({"checkpoint": "runs/full/step-000020"}))
    (full / "videos").mkdir()
    (full / "videos" / "seed_0.mp4").write_bytes(b"")
    (full / "contact_sheet.png").write_bytes(b"")
    mean = tmp_path / "rollouts" / "mean" / "episodes"
    mean.mkdir(parents=True)
    for s in range(10):
        (mean / f"{s}.json").write_text(json.dumps({"seed": s, "success": False}))
    (mean / "summary.json").write_text(json.dumps({"rate": 0.0}))     # not an episode record
    run = tmp_path / "runs" / "full"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 10, "loss": 2.5}\n{"step": 20, "loss": 1.25}\n'
                                       '{"step": 20, "val_loss": 1.5, "val_l1": 0.25}\n')
    (run / "loss_curve.png").write_bytes(b"")
    text = write_report(tmp_path).read_text()
    assert ("| trained (VLA + world model) | 5/10 | 50% | [24%, 76%] | 40.0 | step-000020 |"
            in text)
    assert "| baseline: dataset mean action chunk | 0/10 | 0% | [0%, 28%] |  |  |" in text
    assert "| baseline: scripted expert | not run | | | | |" in text
    assert ("20 steps (0 min of training steps), last logged loss 1.2500; held out at step 20: "
            "l1 0.250; loss curve: runs/full/loss_curve.png") in text
    assert "- rollouts/full/contact_sheet.png\n- rollouts/full/videos/seed_0.mp4" in text


def test_rollout_without_records_is_an_error(tmp_path):
    with pytest.raises(RynnError, match="no per-episode records"):
        read_episodes(tmp_path)
