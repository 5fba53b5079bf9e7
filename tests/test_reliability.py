"""Reliability trials (marker `reliability`, not in the default run): `kill -9` at random moments of
`tokenize` and `train` then a rerun gives byte-identical results; random damage to the cache is
found and repaired; many concurrent exporters; random bit flips in a shard set's manifest.json
and stage.json are every one caught by `verify`.

    make test-reliability                  # RYNN_TRIALS (default 10) trials per kind
    RYNN_TRIALS=3 OMP_NUM_THREADS=1 .venv/bin/pytest -m reliability tests/test_reliability.py
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cache import MANIFEST, verify_cache
from test_integrity import (SMALL, built, concurrent_exports, files, flip, flip_sweep, suite,
                            tokenize)

pytestmark = pytest.mark.reliability
TRIALS = int(os.environ.get("RYNN_TRIALS", "10"))
TIMING = ("data_wait_s", "compute_s", "tokens_per_s")
__all__ = ["built", "suite"]          # module fixtures shared with test_integrity


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def _kill_after(cmd: list[str], delay: float) -> int:
    """Start `cmd`, SIGKILL it after `delay` seconds (if still running); its exit status."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
    return proc.wait()


def _timed(cmd: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.monotonic() - t0


def _cache_data(out: Path) -> dict[str, bytes]:
    """Every published cache file but the stage records (timings) and lock files."""
    return {k: v for k, v in files(out / "cache", record=False).items()
            if "/." not in f"/{k}" and not k.startswith(".")}


def _tokenize_cmd(raw: Path, out: Path) -> list[str]:
    sets = [a for s in (*SMALL, "image.batch_size=1") for a in ("--set", s)]
    return _cmd("tokenize", "--raw", str(raw), "--recipe", "demo", "--out", str(out), *sets)


def test_kill_9_at_random_moments_of_tokenize(suite, tmp_path):
    ref = tmp_path / "ref"
    seconds = _timed(_tokenize_cmd(suite, ref))
    rng = random.Random(0)
    for trial in range(TRIALS):
        out = tmp_path / f"t{trial}"
        for _ in range(2):                  # killed twice at random moments, then finished
            _kill_after(_tokenize_cmd(suite, out), rng.uniform(0, seconds))
        subprocess.run(_tokenize_cmd(suite, out), check=True, capture_output=True)
        assert files(out / "shards", record=False) == files(ref / "shards", record=False), trial
        assert _cache_data(out) == _cache_data(ref), trial
        debris = [p.name for p in out.iterdir() if p.name not in ("cache", "shards",
                                                                    ".shards.lock",
                                                                    ".hashed-shards.json")]
        assert debris == [], (trial, debris)


def _train_cmd(shards: Path, run: Path, resume: bool) -> list[str]:
    sets = [a for s in ("log_every=1", "eval_every=3", "save_every=2", "batch_size=2",
                        "warmup_steps=1") for a in ("--set", s)]
    return _cmd("train", "--shards", str(shards), "--out", str(run), "--preset", "test",
                "--steps", "6", *sets, *(["--resume"] if resume else []))


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_kill_9_at_random_moments_of_train(tiny_shards, tmp_path):
    ref = tmp_path / "ref"
    seconds = _timed(_train_cmd(tiny_shards, ref, resume=False))
    rng = random.Random(1)
    for trial in range(TRIALS):
        run = tmp_path / f"t{trial}"
        _kill_after(_train_cmd(tiny_shards, run, resume=False), rng.uniform(1, seconds))
        _kill_after(_train_cmd(tiny_shards, run, resume=True), rng.uniform(1, seconds))
        subprocess.run(_train_cmd(tiny_shards, run, resume=True), check=True, capture_output=True)
        assert _metrics(run) == _metrics(ref), trial
        last = "step-000006/model.safetensors"
        assert (run / last).read_bytes() == (ref / last).read_bytes(), trial
        assert not list(run.glob(".tmp-*")), trial


DAMAGE = ("flip", "delete", "truncate", "extra")


def _damage(path: Path, how: str, rng: random.Random) -> None:
    if how == "flip":
        flip(path, rng.randrange(path.stat().st_size), rng.randrange(8))
    elif how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: rng.randrange(path.stat().st_size)])
    else:
        (path.parent / "stray.bin").write_bytes(b"x")


def test_random_cache_damage_is_found_and_repaired(suite, built, tmp_path):
    rng = random.Random(2)
    good = files(built / "shards", record=False)
    for trial in range(TRIALS):
        out = Path(shutil.copytree(built, tmp_path / f"t{trial}", symlinks=True))
        candidates = sorted(p for p in (out / "cache").rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(out / "cache").parts))
        target, how = rng.choice(candidates), rng.choice(DAMAGE)
        if target.stat().st_size == 0 and how in ("flip", "truncate"):
            how = "delete"
        _damage(target, how, rng)
        assert verify_cache(out / "cache").problems, (trial, target, how)
        tokenize(suite, out)
        assert files(out / "shards", record=False) == good, (trial, target, how)
        assert verify_cache(out / "cache").problems == [], (trial, target, how)


def test_many_concurrent_exports(built, tmp_path):
    concurrent_exports(built, tmp_path, procs=4, n=10 * TRIALS)


@pytest.mark.parametrize("name", ["manifest.json", MANIFEST])
def test_every_random_manifest_flip_is_caught(built, tmp_path, name):
    flip_sweep(built, tmp_path, flips=20 * TRIALS, seed=3, name=name)
