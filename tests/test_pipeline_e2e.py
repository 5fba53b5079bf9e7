"""The real pipeline end to end on a tiny demo suite: cache hits, selective re-runs, 0 re-encodes
when K changes, kill -9 + rerun byte-identical, bad input through the CLI, determinism."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from sim.demo_data import write_demo_suite
from pipeline.runner import MANIFEST
from pipeline.workflow import plan, resolve_config, tokenize

SMALL = ("image.resolution=64", "image.vq_random_arch=small", "image.batch_size=16")


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("suite")
    write_demo_suite(root, tasks=2, demos=2, steps=30, seed=3)
    return root


def _cfg(*extra: str):
    return resolve_config("demo", [*SMALL, *extra])


def _stage_bytes(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def test_cache_hits_and_selective_reruns(suite, tmp_path):
    out = tmp_path / "out"
    first = tokenize(_cfg(), suite, out, quiet=True)
    assert all(s.hit for s in plan(_cfg(), suite, out))
    stamps = {name: (path / MANIFEST).stat().st_mtime_ns for name, path in first.items()}
    # a bins field: filter and pretokenize stay cached, fit-bins (and what reads it) re-run
    rows = {s.stage.name: s.hit for s in plan(_cfg("bins.num_bins=128"), suite, out)}
    assert rows == {"filter": True, "fit-bins": False, "pretokenize": True, "shards": False}
    second = tokenize(_cfg("bins.num_bins=128"), suite, out, until="fit-bins", quiet=True)
    assert second["filter"] == first["filter"]
    assert (first["filter"] / MANIFEST).stat().st_mtime_ns == stamps["filter"]
    assert second["fit-bins"] != first["fit-bins"]


def test_changing_chunk_encodes_zero_images(suite, tmp_path):
    out = tmp_path / "out"
    first = tokenize(_cfg(), suite, out, quiet=True)
    record = json.loads((first["pretokenize"] / MANIFEST).read_text())
    assert record["counts"]["encodes"] == record["counts"]["unique_pairs"] > 0
    again = tokenize(_cfg("conv.chunk=3"), suite, out, quiet=True)
    assert again["pretokenize"] == first["pretokenize"]          # cache hit: 0 encodes
    assert again["shards"] != first["shards"]
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["config"]["conv.chunk"] == 3 and manifest["conv"]["chunk"] == 3


def test_same_input_twice_is_byte_identical(suite, tmp_path):
    a = tokenize(_cfg(), suite, tmp_path / "a", quiet=True)
    b = tokenize(_cfg(), suite, tmp_path / "b", quiet=True)
    for stage in a:
        assert _stage_bytes(a[stage]) == _stage_bytes(b[stage]), stage


def _cli_tokenize(raw: Path, out: Path) -> subprocess.Popen:
    sets = [arg for s in SMALL for arg in ("--set", s)] + ["--set", "image.batch_size=1"]
    cmd = [sys.executable, "-m", "pipeline.cli", "tokenize", "--raw", str(raw), "--recipe", "demo",
           "--out", str(out), *sets]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for_codes(cache: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if list(cache.glob("pretokenize/.partial-*/codes/*.npy")):
            return
        time.sleep(0.05)
    raise AssertionError("pretokenize never started writing codes")


def test_kill_9_mid_pretokenize_then_rerun_is_byte_identical(suite, tmp_path):
    ref = tokenize(_cfg("image.batch_size=1"), suite, tmp_path / "ref", quiet=True)
    proc = _cli_tokenize(suite, tmp_path / "run")
    _wait_for_codes(tmp_path / "run" / "cache", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "shards").exists()            # nothing half-published
    rerun = _cli_tokenize(suite, tmp_path / "run")
    assert rerun.wait() == 0
    record = json.loads(next((tmp_path / "run" / "cache" / "pretokenize").glob("*/stage.json"))
                        .read_text())
    assert record["counts"]["encodes"] < record["counts"]["unique_pairs"]   # resumed
    assert _stage_bytes(tmp_path / "run" / "shards") == _stage_bytes(ref["shards"])


def _torchrun_tokenize(raw: Path, out: Path) -> subprocess.CompletedProcess:
    sets = [arg for s in SMALL for arg in ("--set", s)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pipeline.cli", "tokenize", "--raw", str(raw), "--recipe", "demo",
           "--out", str(out), *sets]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_torchrun_ranks_split_pretokenize_and_match_one_process(suite, tmp_path):
    """2 ranks each encode their episodes (RANK/WORLD_SIZE); rank 0 publishes: every stage's
    output equals the single-process run's, each pair encoded once; a rerun is all hits."""
    ref = tokenize(_cfg(), suite, tmp_path / "one", quiet=True)
    out = tmp_path / "two"
    proc = _torchrun_tokenize(suite, out)
    assert proc.stdout.strip().splitlines()[-1] == str(out / "shards")     # rank 0 reports once
    for stage, path in ref.items():
        (twin,) = [p for p in (out / "cache" / stage).iterdir() if not p.name.startswith(".")]
        assert twin.name == path.name and _stage_bytes(twin) == _stage_bytes(path), stage
    (record_path,) = (out / "cache" / "pretokenize").glob("*/stage.json")
    record = json.loads(record_path.read_text())
    assert record["ranks"] == 2
    assert record["counts"]["encodes"] == record["counts"]["unique_pairs"] > 0
    assert _stage_bytes(out / "shards") == _stage_bytes(ref["shards"])
    stamp = record_path.stat().st_mtime_ns
    _torchrun_tokenize(suite, out)
    assert all(s.hit for s in plan(_cfg(), suite, out))
    assert record_path.stat().st_mtime_ns == stamp


def test_cli_help_lists_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("demo-data", "plan", "tokenize", "verify", "inspect", "decode", "train"):
        assert cmd in result.output


@pytest.mark.parametrize("breakage", ["truncated", "missing_key", "nan"])
def test_bad_input_fails_clearly_and_publishes_nothing(suite, tmp_path, breakage):
    raw = tmp_path / "raw"
    shutil.copytree(suite, raw)
    victim = sorted(raw.glob("*.hdf5"))[0]
    if breakage == "truncated":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    else:
        with h5py.File(victim, "r+") as f:
            if breakage == "missing_key":
                del f["data/demo_1/obs/ee_pos"]
            else:
                f["data/demo_1/actions"][3, 2] = float("nan")
    args = ["tokenize", "--raw", str(raw), "--recipe", "demo", "--out", str(tmp_path / "out"),
            *[a for s in SMALL for a in ("--set", s)]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert victim.name in result.output
    if breakage != "truncated":
        assert "demo_1" in result.output
    assert not (tmp_path / "out" / "shards").exists()
    published = list((tmp_path / "out" / "cache").glob("*/*/stage.json"))
    assert not [p for p in published if "filter" in str(p)]
    shutil.copy(suite / victim.name, victim)                      # fixed input: a rerun works
    assert CliRunner().invoke(app, args).exit_code == 0
