"""Thread budget: processes x intra-op threads never exceed the cores this process may use; and
the one background pump (`background`) that runs an iterator in a thread.

torch (OpenMP) starts as many intra-op threads per process as the machine has cores. Several such
processes on the same cores (pretokenize workers, torchrun ranks on a CPU, rollout environments
beside a trainer) then spin against each other and run many times slower than their fair share.
Every place that starts processes or sizes a thread pool asks this module instead:

    from pipeline.threads import threads_per_process, limit_threads, child_env
    threads_per_process(4)        # threads for each of 4 processes sharing this process's cores
    limit_threads(4)              # in each of 4 worker processes: torch.set_num_threads(share)
    subprocess.Popen(cmd, env=child_env(4))   # a non-torch child: OMP/MKL/BLAS variables set

The cores come from `os.sched_getaffinity(0)` (what `taskset`, cpusets and Slurm grant), capped by
a cgroup v2 CPU quota (`docker --cpus`) when one is set. `RYNN_THREADS=N` overrides the result:
every process then uses N threads, whatever the count of processes.

Other people's processes on the same cores are outside any budget. There, OpenMP threads that
spin while waiting for a descheduled sibling cost far more than a fair share (measured on a
shared 2-core machine at load 8-9: pretokenize 13x slower with 2 spinning threads than with 1).
`passive_openmp()`, called by `rynn-pipe` and `python -m bench` before torch loads, makes waiting
threads sleep instead (`OMP_WAIT_POLICY=PASSIVE`, unless the variable is already set; set it to
ACTIVE to get spinning back).

`background(source, depth)` runs an iterator in a thread a bounded number of items ahead of its
consumer (pretokenize's loader and encoder, the shard reader's batches):

    for batch in background(make_batches(), depth=4, name="loader"):   # errors re-raise here
        ...
"""

from __future__ import annotations

import math
import os
import queue
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

ENV = "RYNN_THREADS"
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
WAIT_POLICY = "OMP_WAIT_POLICY"
T = TypeVar("T")


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, _cgroup_quota() or cores))


def _cgroup_quota() -> int | None:
    """ceil(quota / period) from cgroup v2 `cpu.max` ("max 100000" means no quota)."""
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))


def override() -> int | None:
    """Threads per process from `RYNN_THREADS`, or None when unset."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{ENV}={raw!r}: expected a positive integer (threads per process)")
    return int(raw)


def threads_per_process(processes: int = 1, cores: int | None = None) -> int:
    """Intra-op threads for each of `processes` processes sharing this process's cores.

    `RYNN_THREADS` when set; else floor(cores / processes), at least 1 (more processes than
    cores run one thread each). `cores` defaults to `usable_cores()`.
    """
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    forced = override()
    if forced is not None:
        return forced
    return max(1, (cores or usable_cores()) // processes)


def local_processes() -> int:
    """Processes of this job on this machine: torchrun's `LOCAL_WORLD_SIZE`, else 1."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def limit_threads(processes: int = 1) -> int:
    """Set this process's torch intra-op threads to its share; returns the count.

    Call it first thing in each of `processes` worker processes (a pool initializer), or with
    the default 1 in a process that runs alone.
    """
    import torch  # here, not at the top: passive_openmp() must be able to run before torch loads
    threads = threads_per_process(processes)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def child_env(processes: int = 1, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for one of `processes` child processes: OpenMP/MKL/BLAS threads set to its
    share and sleeping waits (for children that do not call `limit_threads`, e.g. simulator
    processes)."""
    env = dict(os.environ if base is None else base)
    threads = str(threads_per_process(processes))
    env.update({name: threads for name in THREAD_VARS})
    env.setdefault(WAIT_POLICY, "PASSIVE")
    return env


def passive_openmp() -> bool:
    """Set `OMP_WAIT_POLICY=PASSIVE` unless already set; False when too late (torch, and with it
    the OpenMP runtime, is already loaded in this process). Processes started later inherit it."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault(WAIT_POLICY, "PASSIVE")
    return True


@dataclass(frozen=True)
class _Raised:
    error: BaseException


_END = object()


def background(source: Iterable[T], depth: int, *, name: str = "background") -> Iterator[T]:
    """The items of `source`, produced in a daemon thread at most `depth` items ahead.

    Items come in order; an exception raised by `source` re-raises in the consumer after the
    items produced before it. Closing the returned iterator (leaving a `for` loop early, or an
    error in the consumer) stops the thread, waits for it (at most the item it is producing) and
    closes `source`, so pumps nested in one another all stop.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        it = iter(source)
        try:
            for item in it:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(_Raised(exc))
        finally:
            getattr(it, "close", lambda: None)()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not _END:
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()
