"""The closed-loop experiment's report: success rates with 95 % Wilson intervals, losses, videos.

`make sim-experiment` records robosuite Lift expert demos (`rynn-pipe sim-data`), tokenizes them
with the `sim_lift` recipe, trains twice on the CPU (the natural VLA / world-model mix, and VLA
only: `--set mix=1.0`), rolls out both checkpoints in both action modes and the `mean` and `expert`
baselines on the same seeded Lift episodes (`rynn-pipe rollout`), then calls
`rynn-pipe sim-report EXP`, which reads this layout and writes EXP/report.md:

    EXP/raw/                       sim-data HDF5
    EXP/tok/shards/                tokenized shards
    EXP/runs/<run>/                training runs (metrics.jsonl, loss_curve.png), run = full | vla
    EXP/rollouts/<arm>/            rollout outputs, arm = one of ARMS

A rollout directory is read for its per-episode records: JSON objects with `seed` and `success`
(one per line in a *.jsonl file, or a *.json file holding one record or a list of them).

    from sim.experiment import write_report
    write_report(Path("out/sim_experiment"))
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import RynnError
from pipeline.io import read_json, read_jsonl, write_bytes
from sim.rollout import wilson

ARMS = ("full", "full-discrete", "vla", "vla-discrete", "mean", "expert")
RUNS = {"full": "trained (VLA + world model)", "vla": "trained (VLA only, mix=1.0)"}
LABELS = {**RUNS,
          "full-discrete": "trained (VLA + world model), discrete actions",
          "vla-discrete": "trained (VLA only, mix=1.0), discrete actions",
          "mean": "baseline: dataset mean action chunk", "expert": "baseline: scripted expert"}


def _records(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        items = read_jsonl(path)
    else:
        loaded = read_json(path)
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


def _summary(rollout: Path) -> dict:
    """The rollout's summary.json (rynn-pipe rollout writes one), or {} without it."""
    path = rollout / "summary.json"
    return read_json(path) if path.is_file() else {}


def _success_rows(exp: Path) -> list[str]:
    rows = ["| arm | successes | rate | 95 % Wilson interval | mean steps | checkpoint |",
            "|---|---|---|---|---|---|"]
    for arm in ARMS:
        where = exp / "rollouts" / arm
        if not where.is_dir():
            rows.append(f"| {LABELS[arm]} | not run | | | | |")
            continue
        eps = read_episodes(where)
        k, n = sum(bool(e["success"]) for e in eps), len(eps)
        lo, hi = wilson(k, n)
        steps = [e["steps"] for e in eps if "steps" in e]
        mean_steps = f"{sum(steps) / len(steps):.1f}" if steps else ""
        ckpt = _summary(where).get("checkpoint") or ""
        rows.append(f"| {LABELS[arm]} | {k}/{n} | {k / n:.0%} | [{lo:.0%}, {hi:.0%}] | "
                    f"{mean_steps} | {Path(ckpt).name if ckpt else ''} |")
    return rows


def _training_rows(exp: Path) -> list[str]:
    rows = []
    for run_name, label in RUNS.items():
        run = exp / "runs" / run_name
        metrics = run / "metrics.jsonl"
        if not metrics.exists():
            rows.append(f"- {label}: not trained")
            continue
        logged = read_jsonl(metrics, torn_tail=True)
        train = [r for r in logged if "loss" in r]
        held_out = [r for r in logged if "val_loss" in r]
        last = train[-1] if train else {}
        minutes = sum(r.get("compute_s", 0.0) + r.get("data_wait_s", 0.0) for r in train) / 60
        curve = run / "loss_curve.png"
        line = (f"- {label}: {last.get('step', 0)} steps ({minutes:.0f} min of training steps), "
                f"last logged loss {last.get('loss', float('nan')):.4f}")
        if held_out:
            v = held_out[-1]
            line += (f"; held out at step {v['step']}: " + ", ".join(
                f"{k[4:]} {v[k]:.3f}" for k in ("val_ce_action", "val_ce_image", "val_l1")
                if k in v))
        rows.append(f"{line}; loss curve: {curve.relative_to(exp) if curve.exists() else 'none'}")
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
