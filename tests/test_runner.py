"""The stage runner: content-addressed keys, cache hits, selective re-runs, atomic publish, locks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.config import apply_overrides, recipe
from pipeline.io import write_bytes
from pipeline.runner import MANIFEST, Result, Runner, Stage

CALLS: list[str] = []


def _first(ctx):
    CALLS.append("first")
    n = ctx.cfg.conv.chunk
    write_bytes(ctx.out / "a.txt", f"chunk={n}\n".encode())
    return Result(counts={"in": 1, "out": 1})


def _second(ctx):
    CALLS.append("second")
    text = (ctx.inputs["first"] / "a.txt").read_text()
    write_bytes(ctx.out / "b.txt", f"{text}bins={ctx.cfg.bins.num_bins}\n".encode())
    return Result(counts={"in": 1, "out": 1})


def _third(ctx):
    CALLS.append("third")
    write_bytes(ctx.out / "c.txt", (ctx.inputs["first"] / "a.txt").read_bytes())
    return Result(counts={"in": 1, "out": 1})


FIRST = Stage("first", "1", ("conv.chunk",), ("raw",), _first)
SECOND = Stage("second", "1", ("bins.*",), ("first",), _second)
THIRD = Stage("third", "1", ("shard.*",), ("first",), _third)


@pytest.fixture()
def raw(tmp_path: Path) -> Path:
    root = tmp_path / "raw"
    root.mkdir()
    (root / "x.hdf5").write_bytes(b"data")
    return root


def _run(cfg, raw, cache, stages=(FIRST, SECOND, THIRD)):
    CALLS.clear()
    return Runner(cfg, list(stages), raw=raw, cache=cache, quiet=True).run()


def test_second_run_is_a_cache_hit(raw, tmp_path):
    cfg = recipe("demo")
    first = _run(cfg, raw, tmp_path / "c")
    assert CALLS == ["first", "second", "third"]
    again = _run(cfg, raw, tmp_path / "c")
    assert CALLS == [] and again == first


def test_changing_a_field_reruns_only_its_readers(raw, tmp_path):
    cfg = recipe("demo")
    _run(cfg, raw, tmp_path / "c")
    _run(apply_overrides(cfg, ["bins.num_bins=128"]), raw, tmp_path / "c")
    assert CALLS == ["second"]
    _run(apply_overrides(cfg, ["conv.chunk=7"]), raw, tmp_path / "c")
    assert CALLS == ["first", "second", "third"]


def test_raw_change_invalidates(raw, tmp_path):
    cfg = recipe("demo")
    _run(cfg, raw, tmp_path / "c")
    (raw / "x.hdf5").write_bytes(b"other data")
    _run(cfg, raw, tmp_path / "c")
    # `first` re-runs; its output bytes are unchanged, so downstream keys (content-addressed on
    # the upstream outputs) still hit: early cut-off, no needless work.
    assert CALLS == ["first"]


def test_manifest_records_config_inputs_outputs(raw, tmp_path):
    done = _run(recipe("demo"), raw, tmp_path / "c")
    man = json.loads((done["second"] / MANIFEST).read_text())
    assert man["stage"] == "second" and man["config"]["bins.num_bins"] == 256
    assert set(man["inputs"]) == {"first"}
    assert man["outputs"][0]["path"] == "b.txt" and len(man["outputs"][0]["sha256"]) == 64
    assert "seconds" in man["timings"] and "numpy" in man["tools"]


def test_plan_reports_hits_and_runs_nothing(raw, tmp_path):
    cfg = recipe("demo")
    runner = Runner(cfg, [FIRST, SECOND], raw=raw, cache=tmp_path / "c", quiet=True)
    CALLS.clear()
    assert [s.hit for s in runner.plan()] == [False, False] and CALLS == []
    runner.run()
    assert [s.hit for s in runner.plan()] == [True, True]


def test_failed_stage_publishes_nothing(raw, tmp_path):
    def boom(ctx):
        write_bytes(ctx.out / "half.txt", b"x")
        raise RuntimeError("stage failed")
    bad = Stage("bad", "1", (), ("raw",), boom)
    with pytest.raises(RuntimeError):
        Runner(recipe("demo"), [bad], raw=raw, cache=tmp_path / "c", quiet=True).run()
    published = [p for p in (tmp_path / "c" / "bad").iterdir() if not p.name.startswith(".")]
    assert published == []


SLOW_STAGE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pipeline.config import recipe
    from pipeline.io import write_bytes
    from pipeline.runner import Result, Runner, Stage

    def slow(ctx):
        for i in range(6):
            part = ctx.out / f"part-{i}.txt"
            if not part.exists():           # resume: finished parts are kept
                time.sleep(float(sys.argv[3]))
                write_bytes(part, f"part {i}\\n".encode())
        return Result(counts={"out": 6})

    stage = Stage("slow", "1", (), ("raw",), slow)
    done = Runner(recipe("demo"), [stage], raw=Path(sys.argv[1]), cache=Path(sys.argv[2]),
                  quiet=True).run()
    print(done["slow"])
""")


def _slow(raw: Path, cache: Path, delay: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SLOW_STAGE, str(raw), str(cache), str(delay)],
                            stdout=subprocess.PIPE, text=True)


def _outputs(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != MANIFEST}


def test_kill_9_then_rerun_is_byte_identical(raw, tmp_path):
    ref = _slow(raw, tmp_path / "ref", 0.0)
    ref_dir = Path(ref.communicate()[0].strip())
    proc = _slow(raw, tmp_path / "c", 0.3)
    time.sleep(1.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stage_dir = tmp_path / "c" / "slow"
    assert not any((p / MANIFEST).exists() for p in stage_dir.iterdir())  # nothing published
    rerun = _slow(raw, tmp_path / "c", 0.0)
    out = Path(rerun.communicate()[0].strip())
    assert _outputs(out) == _outputs(ref_dir)


def test_concurrent_runs_do_not_corrupt(raw, tmp_path):
    procs = [_slow(raw, tmp_path / "c", 0.05) for _ in range(2)]
    outs = {Path(p.communicate()[0].strip()) for p in procs}
    assert len(outs) == 1 and all(p.returncode == 0 for p in procs)
    assert len(_outputs(outs.pop())) == 6
