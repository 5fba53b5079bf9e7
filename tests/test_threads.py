"""The thread budget (pipeline/threads.py): shares of the usable cores, the override, and that a
spawned worker process (the pretokenize pool initializer) really runs with its share; the
background pump (order, errors, bounded lead, clean stop)."""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from pipeline import threads
from stages import encode


def test_share_is_cores_over_processes(monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    assert threads.threads_per_process(1, cores=8) == 8
    assert threads.threads_per_process(3, cores=8) == 2      # 3 x 2 <= 8
    assert threads.threads_per_process(16, cores=8) == 1     # never 0
    with pytest.raises(ValueError, match="processes"):
        threads.threads_per_process(0, cores=8)


def test_usable_cores_follow_affinity_and_cgroup_quota(monkeypatch, tmp_path):
    affinity = len(os.sched_getaffinity(0))
    monkeypatch.setattr(threads, "CGROUP_CPU_MAX", tmp_path / "missing")
    assert threads.usable_cores() == affinity
    quota = tmp_path / "cpu.max"
    quota.write_text("50000 100000\n")                       # half a core: one thread
    monkeypatch.setattr(threads, "CGROUP_CPU_MAX", quota)
    assert threads.usable_cores() == 1
    quota.write_text("max 100000\n")
    assert threads.usable_cores() == affinity


def test_override_by_environment(monkeypatch):
    monkeypatch.setenv(threads.ENV, "3")
    assert threads.threads_per_process(16, cores=2) == 3
    assert threads.child_env(4)["OMP_NUM_THREADS"] == "3"
    monkeypatch.setenv(threads.ENV, "zero")
    with pytest.raises(ValueError, match="RYNN_THREADS='zero'"):
        threads.threads_per_process()


def _worker_view() -> tuple[int, int]:
    return torch.get_num_threads(), len(os.sched_getaffinity(0))


def _pool_threads(workers: int) -> set[int]:
    """torch threads seen inside each worker of a spawned pool set up like pretokenize's."""
    share = threads.threads_per_process(workers)
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=encode._init_worker,
                             initargs=(ctx.Queue(), share)) as pool:
        seen = [pool.submit(_worker_view) for _ in range(2 * workers)]
        return {f.result()[0] for f in seen}


def test_worker_process_gets_its_share(monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    cores = threads.usable_cores()
    assert _pool_threads(2) == {max(1, cores // 2)}
    assert max(1, cores // 2) * 2 <= max(2, cores)           # never oversubscribed


def test_worker_process_honours_override(monkeypatch):
    monkeypatch.setenv(threads.ENV, "3")
    assert _pool_threads(2) == {3}


def test_limit_threads_sets_torch(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv(threads.ENV, "1")
    try:
        assert threads.limit_threads(4) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def _fresh_python(code: str, **env: str) -> str:
    full = {k: v for k, v in os.environ.items() if k != threads.WAIT_POLICY} | env
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True,
                          check=True).stdout.split()


def test_passive_openmp_before_torch_loads_and_respects_the_user():
    code = ("import os; from pipeline.threads import passive_openmp; ok = passive_openmp(); "
            "import torch; print(ok, os.environ['OMP_WAIT_POLICY'])")
    assert _fresh_python(code) == ["True", "PASSIVE"]
    assert _fresh_python(code, OMP_WAIT_POLICY="ACTIVE") == ["True", "ACTIVE"]
    assert threads.passive_openmp() is False          # torch is loaded in this process
    assert threads.child_env(2, base={})[threads.WAIT_POLICY] == "PASSIVE"


def _pump_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("pump-")]


def test_background_keeps_order_and_reraises_after_earlier_items():
    def source():
        yield from range(5)
        raise RuntimeError("bad item 5")

    seen = []
    with pytest.raises(RuntimeError, match="bad item 5"):
        for item in threads.background(source(), depth=2, name="pump-order"):
            seen.append(item)
    assert seen == [0, 1, 2, 3, 4] and not _pump_threads()


def test_background_runs_at_most_depth_ahead():
    produced = []

    def source():
        for i in range(100):
            produced.append(i)
            yield i

    pump = threads.background(source(), depth=3, name="pump-depth")
    assert next(pump) == 0
    time.sleep(0.3)
    assert len(produced) <= 1 + 3 + 1       # handed out, queued, one blocked in put
    pump.close()


def test_closing_stops_nested_pumps_and_closes_their_sources():
    closed = []

    def endless(tag):
        try:
            yield from itertools.count()
        finally:
            closed.append(tag)

    def doubled(items):
        try:
            for i in items:
                yield 2 * i
        finally:
            items.close()

    inner = threads.background(endless("inner"), depth=2, name="pump-inner")
    outer = threads.background(doubled(inner), depth=2, name="pump-outer")
    assert [next(outer) for _ in range(3)] == [0, 2, 4]
    outer.close()
    assert closed == ["inner"] and not _pump_threads()
    with pytest.raises(ValueError, match="depth"):
        next(threads.background([], depth=0))
