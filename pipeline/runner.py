"""Stage runner with a content-addressed cache.

A stage is a `Stage` spec: a name, a code version, the config fields it reads, the stages (or "raw")
it depends on, and `run(ctx) -> Result`. Its output directory is

    <cache>/<stage>/<key>/            key = sha256(name, version, fields read, input digests)[:16]

published atomically: the stage writes into `<cache>/<stage>/.partial-<key>/` (kept across a
crash, so a stage may resume from what it finished), the runner writes the stage manifest
`stage.json` there LAST (config, input digests, counts, outputs with sha256, timings, tools), then
renames the directory onto its key. A directory whose files all match its `stage.json` (sizes and
sha256, checked before use: pipeline/cache.py) is a cache hit: no work. A damaged or missing file
invalidates the output, which is rebuilt, with one line saying what was found.
(A stage may write its own deterministic `manifest.json`, as the shard set does; timings live only
in `stage.json` so that data outputs stay byte-identical between runs.)
A per-key file lock keeps two concurrent runs from working on the same key.
Under torchrun (pipeline/group.py) a stage marked `distributed` runs on every rank at once: rank 0
holds the key's lock, all ranks write into the partial directory, rank 0 publishes.

    from pipeline.workflow import make_runner
    outputs = make_runner(cfg, raw=Path("demos"), out=Path("out/demo")).run()  # {stage: dir}
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy
from rich.markup import escape

from pipeline import __version__
from pipeline.cache import MANIFEST, output_problem, record_digest, remember_hashes
from pipeline.config import ConfigView, RunConfig, digest, select
from pipeline.errors import StageError
from pipeline.group import Group
from pipeline.io import file_entry, read_json, walk_files, write_json
from pipeline.progress import Progress, console

SCHEMA = 1
RAW = "raw"


@dataclass(frozen=True)
class Stage:
    name: str
    version: str
    fields: tuple[str, ...]            # config fields read: "conv.chunk" or groups "conv.*"
    deps: tuple[str, ...]              # upstream stage names, or "raw" for the raw data root
    run: Callable[["Context"], "Result"]
    # estimate(ctx) -> {"episodes": n, "frames": n, "images": n, ...}; ctx.out is not created.
    estimate: Callable[["Context"], dict[str, int]] | None = None
    # Which of its inputs a stage digests; default: each dep's published output digest.
    input_digest: Callable[["Context"], dict[str, str]] | None = None
    # Runs on every rank of a torchrun group, splitting its work (see pipeline/group.py).
    distributed: bool = False
    # Fields it also reads that cannot change its output bytes (devices, worker counts, batch
    # sizes): readable, but not part of the key. Any other read raises (pipeline.config.ConfigView).
    untracked: tuple[str, ...] = ()

    def context(self, cfg: RunConfig, **kwargs: Any) -> "Context":
        """The context this stage runs in: `cfg` seen through a view of its declared fields."""
        return Context(cfg=ConfigView(cfg, self.fields + self.untracked, self.name), **kwargs)


@dataclass
class Context:
    cfg: ConfigView                     # RunConfig, readable only where the stage declared it
    raw: Path | None                    # raw data root (suite sub-directory applied)
    inputs: dict[str, Path]             # dep stage name -> its published output directory
    out: Path                           # where to write; survives a crash (resume from it)
    quiet: bool = False
    group: Group = field(default_factory=Group)   # ranks sharing a `distributed` stage's work

    def __post_init__(self) -> None:
        if not isinstance(self.cfg, ConfigView):
            raise TypeError("Context.cfg must be a ConfigView: build it with Stage.context(cfg, ...)")

    def log(self, msg: str) -> None:
        if not self.quiet and self.group.leader:
            console.print(msg)

    def warn(self, msg: str) -> None:
        if self.group.leader:                        # the same on every rank: say it once
            console.print(f"[bold yellow]WARNING[/]: {escape(msg)}", soft_wrap=True)

    def progress(self, total: int, desc: str) -> Progress:
        return Progress(total, desc, disable=self.quiet or not self.group.leader)


@dataclass
class Result:
    counts: dict[str, Any]              # {"in": n, "out": n, "dropped": {reason: n}, ...}
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageStatus:
    stage: Stage
    key: str
    path: Path
    hit: bool
    work: dict[str, int] = field(default_factory=dict)
    damage: str | None = None          # what was wrong with a published output (it reruns)


# ---------------------------------------------------------------------------------------------

def raw_fingerprint(raw: Path) -> str:
    """Digest of the raw data root: relative path, size and mtime of every file (like make),
    dot-directories and files reached through symlinked directories included: whatever a reader
    may open is in it.

    Content hashing tens of GB of HDF5 on every run would cost more than the stages it skips;
    a touched or rewritten file changes size or mtime and invalidates the cache.
    """
    if not raw.exists():
        raise StageError(f"raw data root {raw} does not exist; point --raw (or DATA=) at it")
    rows = []
    for p in walk_files(raw):
        st = p.stat()
        rows.append((p.relative_to(raw).as_posix(), st.st_size, st.st_mtime_ns))
    return digest(rows)


def output_digest(path: Path) -> str:
    """Digest of a published stage output: the sha256 of its file list in the manifest."""
    return digest(read_json(path / MANIFEST)["outputs"])


def stage_key(stage: Stage, cfg: RunConfig, input_digests: dict[str, str]) -> str:
    return digest({"stage": stage.name, "version": stage.version,
                   "config": select(cfg, stage.fields), "inputs": input_digests})[:16]


@contextlib.contextmanager
def key_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def tool_versions() -> dict[str, str]:
    out = {"rynn_pipe": __version__, "python": platform.python_version(),
           "numpy": numpy.__version__, "h5py": h5py.__version__}
    for mod in ("torch", "transformers"):
        if mod in sys.modules:
            out[mod] = sys.modules[mod].__version__
    return out


def _publish(stage: Stage, ctx: Context, key: str, inputs: dict[str, str], final: Path,
             result: Result, seconds: float) -> None:
    for debris in ctx.out.rglob(".tmp-*"):      # a killed earlier attempt's unfinished write
        debris.unlink()
    outputs = [file_entry(p, ctx.out) for p in sorted(ctx.out.rglob("*"))
               if p.is_file() and p.name != MANIFEST]
    manifest = {"schema": SCHEMA, "stage": stage.name, "version": stage.version, "key": key,
                "config": select(ctx.cfg, stage.fields), "inputs": inputs,
                "counts": result.counts, **result.extra, "outputs": outputs,
                "timings": {"seconds": round(seconds, 3)}, "tools": tool_versions()}
    manifest["digest"] = record_digest(manifest)
    write_json(ctx.out / MANIFEST, manifest)
    os.replace(ctx.out, final)
    remember_hashes(final)


class Runner:
    """Resolves keys for a list of stages and runs the ones that are not cached."""

    def __init__(self, cfg: RunConfig, stages: list[Stage], *, raw: Path | None, cache: Path,
                 quiet: bool = False, group: Group | None = None) -> None:
        self.cfg, self.stages, self.raw, self.cache, self.quiet = cfg, stages, raw, cache, quiet
        self.group = group or Group()
        self._raw_fp: str | None = None

    def _ctx(self, stage: Stage, inputs: dict[str, Path], out: Path) -> Context:
        return stage.context(self.cfg, raw=self.raw, inputs=inputs, out=out, quiet=self.quiet,
                             group=self.group)

    def _digests(self, stage: Stage, ctx: Context) -> dict[str, str]:
        if stage.input_digest is not None:
            return stage.input_digest(ctx)
        out = {}
        for dep in stage.deps:
            if dep == RAW:
                if self._raw_fp is None:
                    self._raw_fp = raw_fingerprint(self.raw)
                out[RAW] = self._raw_fp
            else:
                out[dep] = output_digest(ctx.inputs[dep])
        return out

    def resolve(self, stage: Stage, done: dict[str, Path]) -> StageStatus:
        inputs = {d: done[d] for d in stage.deps if d != RAW}
        ctx = self._ctx(stage, inputs, out=Path("/nonexistent"))
        key = stage_key(stage, self.cfg, self._digests(stage, ctx))
        path = self.cache / stage.name / key
        damage = output_problem(path) if (path / MANIFEST).exists() else None
        return StageStatus(stage, key, path, hit=(path / MANIFEST).exists() and damage is None,
                           damage=damage)

    def plan(self) -> list[StageStatus]:
        """Keys and hit/miss for every stage, without running anything.

        A stage whose upstream will run cannot know its key yet: it is reported as "will run".
        """
        done: dict[str, Path] = {}
        rows = []
        for stage in self.stages:
            if any(d != RAW and d not in done for d in stage.deps):
                rows.append(StageStatus(stage, "?", Path("?"), hit=False))
                continue
            st = self.resolve(stage, done)
            if stage.estimate is not None and not st.hit:
                st.work = stage.estimate(self._ctx(stage, {d: done[d] for d in stage.deps
                                                           if d != RAW}, st.path))
            rows.append(st)
            if st.hit:
                done[stage.name] = st.path
        return rows

    def run(self, only: set[str] | None = None) -> dict[str, Path]:
        done: dict[str, Path] = {}
        for stage in self.stages:
            st = self.resolve(stage, done)
            done[stage.name] = self._run_one(st, done)
            if only is not None and only <= set(done):
                break
        return done

    def _run_one(self, st: StageStatus, done: dict[str, Path]) -> Path:
        """Under torchrun: `distributed` stages run on every rank, any other stage on rank 0
        while the others wait, then find its output."""
        if self.group.world > 1:
            if st.stage.distributed:
                return self._run_group(st, done)
            if self.group.leader:
                self._run_here(st, done)
            self.group.barrier()
            if not (st.path / MANIFEST).exists():
                raise StageError(f"{st.stage.name}: rank 0 did not publish {st.path}")
            return st.path
        return self._run_here(st, done)

    def _run_here(self, st: StageStatus, done: dict[str, Path]) -> Path:
        stage = st.stage
        if st.hit:
            self._say(f"[green]cache hit[/] {stage.name} ({st.key}): no work")
            return st.path
        self._damaged(st)
        with key_lock(self.cache / stage.name / f".lock-{st.key}"):
            if _sound(st.path):  # another process finished (or repaired) it while we waited
                self._say(f"[green]cache hit[/] {stage.name} ({st.key}): finished by another run")
                return st.path
            if st.path.exists():  # a directory without manifest is never valid output
                shutil.rmtree(st.path)
            partial = self.cache / stage.name / f".partial-{st.key}"
            partial.mkdir(parents=True, exist_ok=True)
            ctx = self._ctx(stage, {d: done[d] for d in stage.deps if d != RAW}, partial)
            self._say(f"[bold]running[/] {stage.name} ({st.key})")
            t0 = time.perf_counter()
            result = stage.run(ctx)
            _publish(stage, ctx, st.key, self._digests(stage, ctx), st.path, result,
                     time.perf_counter() - t0)
        self._say(f"[green]done[/] {stage.name}: {_fmt_counts(result.counts)} -> {st.path}")
        return st.path

    def _run_group(self, st: StageStatus, done: dict[str, Path]) -> Path:
        """A `distributed` stage on every rank: rank 0 takes the key's lock (keeping other runs
        out) and prepares the partial directory; all ranks run the stage, which splits the work
        and meets at its own collectives; rank 0 publishes; all ranks leave together."""
        stage, group = st.stage, self.group
        with contextlib.ExitStack() as held:
            finished = False
            if group.leader:
                finished = st.hit
                if not finished:
                    self._damaged(st)
                    held.enter_context(key_lock(self.cache / stage.name / f".lock-{st.key}"))
                    finished = _sound(st.path)                 # finished while we waited
                if not finished and st.path.exists():
                    shutil.rmtree(st.path)
            if group.leader_says(finished):
                self._say(f"[green]cache hit[/] {stage.name} ({st.key}): no work")
                return st.path
            partial = self.cache / stage.name / f".partial-{st.key}"
            if group.leader:
                partial.mkdir(parents=True, exist_ok=True)
            group.barrier()
            ctx = self._ctx(stage, {d: done[d] for d in stage.deps if d != RAW}, partial)
            self._say(f"[bold]running[/] {stage.name} ({st.key}) on {group.world} ranks")
            t0 = time.perf_counter()
            result = stage.run(ctx)
            if group.leader:
                _publish(stage, ctx, st.key, self._digests(stage, ctx), st.path, result,
                         time.perf_counter() - t0)
            group.barrier()
        self._say(f"[green]done[/] {stage.name}: {_fmt_counts(result.counts)} -> {st.path}")
        return st.path

    def _say(self, msg: str) -> None:
        if not self.quiet and self.group.leader:
            console.print(msg)

    def _damaged(self, st: StageStatus) -> None:
        """One line saying what was wrong with a cached output about to be rebuilt."""
        if st.damage is not None and self.group.leader:
            console.print(f"[bold yellow]cache damaged[/]: {st.stage.name} ({st.key}): "
                          f"{escape(st.damage)}; rebuilding", soft_wrap=True)


def _sound(path: Path) -> bool:
    return (path / MANIFEST).exists() and output_problem(path) is None


def _fmt_counts(counts: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in counts.items() if not isinstance(v, dict))
