"""Trust nothing on disk: check published stage outputs against their `stage.json`, and tidy the cache.

A published output `<cache>/<stage>/<key>/` lists every file with size and sha256 in `stage.json`
(which carries a digest of its own fields). Before a cache hit is used it is checked: every listed
file present with its size and sha256, no unlisted file. Re-hashing is skipped only for a file
whose (size, mtime, ctime, inode) equal those recorded when it was last hashed
(`<cache>/<stage>/.hashed-<key>.json`); any write, rename or replacement changes the ctime, so a
changed file is always re-hashed.

    rynn-pipe cache verify --cache out/demo/cache      # re-hash every entry; exit 1 on damage
    rynn-pipe cache gc --cache out/demo/cache [--keep out/demo]
    from pipeline.cache import output_problem
    problem = output_problem(path)           # None when the output is sound
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import digest
from pipeline.errors import RynnError
from pipeline.io import read_json, sha256_file, write_json

MANIFEST = "stage.json"  # the runner's record of a stage run; written last
PARTIAL = ".partial-"
LOCK = ".lock-"
HASHED = ".hashed-"


def record_digest(manifest: dict[str, Any]) -> str:
    """The digest `stage.json` carries over all its other fields."""
    return digest({k: v for k, v in manifest.items() if k != "digest"})


def hashed_path(path: Path) -> Path:
    return path.parent / f"{HASHED}{path.name}.json"


def _signature(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def read_record(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(stage.json, None) when it is readable and its digest matches, else (None, problem)."""
    try:
        manifest = read_json(path / MANIFEST)
    except FileNotFoundError:
        return None, f"{MANIFEST} is missing"
    except (OSError, ValueError) as exc:
        return None, f"{MANIFEST} is unreadable ({type(exc).__name__})"
    if not isinstance(manifest, dict) or "digest" not in manifest:
        return None, f"{MANIFEST} has no digest (written by an older rynn-pipe)"
    if manifest["digest"] != record_digest(manifest):
        return None, f"{MANIFEST} was modified (its digest does not match its fields)"
    return manifest, None


def output_problem(path: Path, *, fast: bool = True) -> str | None:
    """What is wrong with the published output at `path`, or None when every file matches.

    `fast` skips re-hashing files unchanged since they were last hashed (see the module doc)."""
    manifest, problem = read_record(path)
    if manifest is None:
        return problem
    seen = _read_hashed(path) if fast else {}
    fresh: dict[str, list[int]] = {}
    for entry in manifest.get("outputs", []):
        name, file = entry["path"], path / entry["path"]
        try:
            st = file.stat()
        except OSError:
            return f"{name} is missing"
        if st.st_size != entry["bytes"]:
            return f"{name} has {st.st_size} bytes, {MANIFEST} says {entry['bytes']}"
        sig = _signature(st)
        if seen.get(name) != sig and sha256_file(file) != entry["sha256"]:
            return f"{name} does not match its sha256 in {MANIFEST}"
        fresh[name] = sig
    listed = set(fresh) | {MANIFEST}
    extra = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                   if p.is_file() and p.relative_to(path).as_posix() not in listed)
    if extra:
        return f"{extra[0]} is not listed in {MANIFEST}"
    if fast and fresh != seen:
        remember_hashes(path, fresh)
    return None


def remember_hashes(path: Path, sigs: dict[str, list[int]] | None = None) -> None:
    """Record the signatures of `path`'s files as hashed now (called right after hashing)."""
    if sigs is None:
        manifest = read_json(path / MANIFEST)
        sigs = {e["path"]: _signature((path / e["path"]).stat()) for e in manifest["outputs"]}
    with contextlib.suppress(OSError):       # only an optimization: a read-only cache still works
        write_json(hashed_path(path), sigs)


def _read_hashed(path: Path) -> dict[str, list[int]]:
    try:
        out = read_json(hashed_path(path))
    except (OSError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


# ---------------------------------------------------------------------------------------------
# `rynn-pipe cache verify` / `cache gc`.
# ---------------------------------------------------------------------------------------------

@dataclass
class CacheReport:
    entries: int = 0
    problems: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    bytes_freed: int = 0


def entries(cache: Path) -> list[Path]:
    """Every published entry `<cache>/<stage>/<key>/` (names not starting with a dot)."""
    if not cache.is_dir():
        return []
    return sorted(p for stage in cache.iterdir() if stage.is_dir() and not stage.name.startswith(".")
                  for p in stage.iterdir() if p.is_dir() and not p.name.startswith("."))


def verify_cache(cache: Path) -> CacheReport:
    """Re-hash every file of every entry (no fast path)."""
    report = CacheReport()
    for entry in entries(cache):
        report.entries += 1
        problem = output_problem(entry, fast=False)
        if problem is not None:
            report.problems.append(f"{entry.relative_to(cache)}: {problem}")
    return report


@contextlib.contextmanager
def _unless_locked(lock: Path):
    """Yields True while holding `lock` (no run is working on that key), False if one is."""
    if not lock.exists():
        yield True
        return
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def gc(cache: Path, keep: list[Path] | None = None) -> CacheReport:
    """Remove partial and temporary entries, damaged or unlisted outputs, stale hash records and,
    when `keep` names shard sets (or output directories holding `shards/`), every entry their
    shards were not built from. Lock files stay (a waiting run may hold one open)."""
    report = CacheReport()
    if not cache.is_dir():
        return report
    live = _reachable(cache, keep) if keep else None
    for stage in sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for p in sorted(stage.iterdir()):
            why = _garbage(p, live)
            if why is not None:
                key = p.name.removeprefix(PARTIAL)
                with _unless_locked(stage / f"{LOCK}{key}") as free:
                    if free:
                        _remove(p, f"{why}", cache, report)
    return report


def _garbage(p: Path, live: set[Path] | None) -> str | None:
    name = p.name
    if name.startswith(PARTIAL):
        return "partial (an interrupted run)"
    if name.startswith(".tmp-"):
        return "temporary"
    if name.startswith(HASHED):
        key = name.removeprefix(HASHED).removesuffix(".json")
        return None if (p.parent / key).is_dir() else "hash record of a removed entry"
    if name.startswith(".") or not p.is_dir():
        return None
    if not (p / MANIFEST).exists():
        return "no stage.json (unfinished)"
    if live is not None and p not in live:
        return "not used by the kept outputs"
    problem = output_problem(p)
    return None if problem is None else f"damaged: {problem}"


def _remove(p: Path, why: str, cache: Path, report: CacheReport) -> None:
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() \
        else p.stat().st_size
    if p.is_dir():
        shutil.rmtree(p)
        with contextlib.suppress(FileNotFoundError):
            hashed_path(p).unlink()
    else:
        p.unlink()
    report.removed.append(f"{p.relative_to(cache)}: {why}")
    report.bytes_freed += size


def _reachable(cache: Path, keep: list[Path]) -> set[Path]:
    """Entries the kept shard sets were built from, following stage.json input digests."""
    by_digest: dict[tuple[str, str], list[Path]] = {}     # two keys may publish equal outputs
    for entry in entries(cache):
        manifest, _ = read_record(entry)
        if manifest is not None:
            by_digest.setdefault((entry.parent.name, digest(manifest["outputs"])), []).append(entry)
    todo = []
    for root in keep:
        shards = root / "shards" if (root / "shards" / MANIFEST).exists() else root
        manifest, problem = read_record(shards)
        if manifest is None:
            raise RynnError(f"--keep {root}: {problem}; point it at a tokenize --out directory "
                            "or its shards/")
        found = by_digest.get((manifest["stage"], digest(manifest["outputs"])), [])
        todo += [e for e in found if e.name == manifest["key"]]
    live: set[Path] = set()
    while todo:
        entry = todo.pop()
        if entry in live:
            continue
        live.add(entry)
        manifest, _ = read_record(entry)
        for dep, dig in (manifest or {}).get("inputs", {}).items():
            todo += by_digest.get((dep, dig), [])
    return live
