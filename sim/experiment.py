"""The closed-loop experiment's report: success rates with 95 % Wilson intervals, losses, videos.

`make sim-experiment` records robosuite Lift expert demos (`rynn-pipe sim-data`), tokenizes them
with the `sim_lift` recipe, trains twice on the CPU (the natural VLA / world-model mix, and VLA
only: `--set mix=1.0`), rolls out both checkpoints and the `mean` and `expert` baselines on the
same seeded Lift episodes (`rynn-pipe rollout`), then calls `rynn-pipe sim-report EXP`, which reads
this layout and writes EXP/report.md:

    EXP/raw/                       sim-data HDF5
    EXP/tok/shards/                tokenized shards
    EXP/runs/<arm>/                training runs (metrics.jsonl, loss_curve.png), arm = full | vla
    EXP/rollouts/<arm>/            rollout outputs, arm = full | vla | mean | expert

A rollout directory is read for its per-episode records: JSON objects with `seed` and `success`
(one per line in a *.jsonl file, or a *.json file holding one record or a list of them).

    from sim.experiment import write_report
    write_report(Path("out/sim_experiment"))
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import RynnError
from pipeline.io import write_bytes
from sim.rollout import wilson

ARMS = ("full", "vla", "mean", "expert")
LABELS = {"full": "trained (VLA + world model)", "vla": "trained (VLA only, mix=1.0)",
          "mean": "baseline: dataset mean action chunk", "expert": "baseline: scripted expert"}


def _records(path: Path) -> list[dict]:
    text = path.read_text()
    if path.suffix == ".jsonl":
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        loaded = json.loads(text)
        items = loaded if isinstance(loaded, list) else [loaded]
    return [r for r in items if isinstance(r, dict) and "success" in r and "seed" in r]


def read_episodes(rollout: Path) -> list[dict]:
    """Per-episode records under a rollout directory, one per (task, seed), sorted by seed."""
    found: dict[tuple, dict] = {}
    for path in sorted(rollout.rglob("*.json*")):
        if path.suffix in (".json", ".jsonl"):
            for rec in _records(path):
                found[(rec.get("task", ""), rec["seed"])] = rec
    if not found:
        raise RynnError(f"no per-episode records (JSON with seed and success) under {rollout}")
    return [found[k] for k in sorted(found, key=lambda k: (str(k[0]), k[1]))]


def _success_rows(exp: Path) -> list[str]:
    rows = ["| arm | successes | rate | 95 % Wilson interval |", "|---|---|---|---|"]
    for arm in ARMS:
        where = exp / "rollouts" / arm
        if not where.is_dir():
            rows.append(f"| {LABELS[arm]} | not run | | |")
            continue
        eps = read_episodes(where)
        k, n = sum(bool(e["success"]) for e in eps), len(eps)
        lo, hi = wilson(k, n)
        rows.append(f"| {LABELS[arm]} | {k}/{n} | {k / n:.0%} | [{lo:.0%}, {hi:.0%}] |")
    return rows


def _training_rows(exp: Path) -> list[str]:
    rows = []
    for arm in ("full", "vla"):
        run = exp / "runs" / arm
        metrics = run / "metrics.jsonl"
        if not metrics.exists():
            rows.append(f"- {LABELS[arm]}: not trained")
            continue
        train = [r for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
        last = train[-1] if train else {}
        curve = run / "loss_curve.png"
        rows.append(f"- {LABELS[arm]}: {last.get('step', 0)} steps, last logged loss "
                    f"{last.get('loss', float('nan')):.4f}; loss curve: "
                    f"{curve.relative_to(exp) if curve.exists() else 'none'}")
    return rows


def write_report(exp: Path) -> Path:
    """Write EXP/report.md from the experiment's runs and rollouts; return its path."""
    exp = Path(exp)
    rollouts = exp / "rollouts"
    videos = sorted(p.relative_to(exp).as_posix() for pattern in ("*.mp4", "contact_sheet.png")
                    for p in rollouts.rglob(pattern)) if rollouts.is_dir() else []
    lines = ["# Closed-loop experiment: robosuite Lift", "",
             "Success over the same seeded Lift episodes (seeds disjoint from the demos').", "",
             *_success_rows(exp), "", "## Training", "", *_training_rows(exp), "",
             "## Videos and contact sheets", "",
             *([f"- {v}" for v in videos] or ["- none recorded"]), ""]
    out = exp / "report.md"
    write_bytes(out, "\n".join(lines).encode())
    return out
