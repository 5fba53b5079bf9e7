"""The training loop on real (tiny) shards: metrics, checkpoints, exact resume, 2-process DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pipeline.errors import RynnError
from trainer import checkpoint as ckpt
from trainer.config import resolve_train_config
from trainer.schedule import lr_at
from trainer.train import train
from train_ranks import weights_sha256

LOSS_KEYS = ("loss", "ce_action", "ce_image", "l1")


def _cfg(**kw):
    cfg = resolve_train_config("test", ["log_every=1", "eval_every=100", "save_every=3",
                                        "keep_last=2", "batch_size=2", "warmup_steps=2"])
    return replace(cfg, **kw)


def _curve(run: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], *(r.get(k) for k in LOSS_KEYS)) for r in rows if "loss" in r]


def test_run_writes_metrics_checkpoints_and_card(tiny_shards, tmp_path):
    run = tmp_path / "run"
    last = train(_cfg(steps=6), tiny_shards, run)
    assert last.name == "step-000006" and (run / "latest").read_text().strip() == last.name
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000003", "step-000006"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    assert {"lr", "tokens_per_s", "data_wait_s", "loss"} <= set(rows[0])
    logged = set().union(*rows)        # a term is logged only on batches holding its tokens
    assert {"ce_action", "ce_image", "l1"} <= logged
    assert any("val_loss" in r for r in rows)                        # held-out evaluation
    assert (run / "loss_curve.png").stat().st_size > 0
    card = json.loads((last / "processor.json").read_text())
    assert card["K"] == 3 and card["D"] == 7 and card["M"] == 2 and card["resolution"] == 32
    assert card["orientation"] == "rot180" and card["vq"]["untrained"] is True
    model = ckpt.load_model(last)
    assert model.chunk == 3 and model.action_dim == 7


def test_stop_and_resume_gives_the_same_loss_curve(tiny_shards, tmp_path):
    full = tmp_path / "full"
    train(_cfg(steps=6), tiny_shards, full)
    part = tmp_path / "part"
    train(_cfg(steps=3), tiny_shards, part)          # stopped at 3, then resumed with more steps
    assert _curve(part)[-1][0] == 3
    train(_cfg(steps=6), tiny_shards, part, resume=True)
    assert _curve(part) == _curve(full)


def test_resume_refuses_other_shards_or_model(tiny_shards, tmp_path):
    run = tmp_path / "run"
    train(_cfg(steps=3), tiny_shards, run)
    other = replace(_cfg(steps=6), model=replace(_cfg().model, layers=3))
    with pytest.raises(RynnError, match=r"another model shape \(model.layers: saved 2, now 3\)"):
        train(other, tiny_shards, run, resume=True)


def _torchrun(shards: Path, run: Path, steps: int, *sets: str, resume: bool = False) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).with_name("train_ranks.py")), "train", "--shards", str(shards), "--out", str(run),
           "--preset", "test", "--steps", str(steps), "--set", "batch_size=2",
           "--set", "log_every=1", *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd + (["--resume"] if resume else []), capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _rank_digests(run: Path) -> list[str]:
    return [json.loads((run / f"rank-{r}.json").read_text())["sha256"] for r in (0, 1)]


def test_torchrun_two_processes_stay_in_sync(tiny_shards, tmp_path):
    run = tmp_path / "ddp"
    _torchrun(tiny_shards, run, 3, "grad_accum=2")
    digests = _rank_digests(run)
    assert digests[0] == digests[1]
    saved = load_file(str(run / "step-000003" / "model.safetensors"))
    assert weights_sha256(saved) == digests[0]          # rank 0 saved what both ranks hold
    assert [r[0] for r in _curve(run)] == [1, 2, 3]


def test_torchrun_fsdp_trains_saves_and_resumes(tiny_shards, tmp_path):
    run = tmp_path / "fsdp"
    _torchrun(tiny_shards, run, 2, "distributed=fsdp")
    _torchrun(tiny_shards, run, 3, "distributed=fsdp", resume=True)
    digests = _rank_digests(run)
    assert digests[0] == digests[1]
    assert [r[0] for r in _curve(run)] == [1, 2, 3]
    assert ckpt.load_model(run / "step-000003").chunk == 3


def test_schedule_warmup_constant_and_cosine():
    assert [lr_at(s, base=1.0, warmup=4, total=10) for s in range(6)] == [0.25, 0.5, 0.75, 1, 1, 1]
    cos = [lr_at(s, base=1.0, warmup=2, total=12, kind="cosine", min_ratio=0.1)
           for s in range(13)]
    assert cos[2] == 1.0 and abs(cos[12] - 0.1) < 1e-12
    assert all(a >= b for a, b in zip(cos[2:], cos[3:]))
