"""Library functions behind the commands: resolve a config, run or plan the data pipeline, export.

    from pipeline.workflow import resolve_config, tokenize
    stage_dirs = tokenize(resolve_config("demo"), raw=Path("demos"), out=Path("out/demo"))
    # the shard set is exported to out/demo/shards
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from pipeline.cache import MANIFEST, output_problem
from pipeline.config import RunConfig, apply_overrides, recipe
from pipeline.errors import RynnError
from pipeline.group import Group
from pipeline.io import fsync_dir
from pipeline.runner import Runner, StageStatus, key_lock


def resolve_config(recipe_name: str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    return apply_overrides(recipe(recipe_name), list(overrides))


def cache_root(out: Path, cache: Path | None = None) -> Path:
    """--cache, else $RYNN_HOME/cache, else <out>/cache."""
    if cache is not None:
        return cache
    home = os.environ.get("RYNN_HOME")
    return Path(home) / "cache" if home else out / "cache"


def raw_root(raw: Path, cfg: RunConfig) -> Path:
    """The suite's directory when `raw` is a data root holding several suites
    (`<raw>/libero_10` or `<raw>/libero_10_no_noops`), else `raw` itself."""
    for name in ((cfg.suite, f"{cfg.suite}_no_noops") if cfg.suite else ()):
        if (raw / name).is_dir():
            return raw / name
    return raw


def make_runner(cfg: RunConfig, raw: Path, out: Path, cache: Path | None = None,
                quiet: bool = False, until: str | None = None,
                group: Group | None = None) -> Runner:
    from stages.registry import pipeline
    stages = pipeline()
    if until is not None:
        names = [s.name for s in stages]
        if until not in names:
            raise RynnError(f"--until {until!r}: unknown stage; choose one of {', '.join(names)}")
        stages = stages[: names.index(until) + 1]
    return Runner(cfg, stages, raw=raw_root(raw, cfg), cache=cache_root(out, cache), quiet=quiet,
                  group=group)


def plan(cfg: RunConfig, raw: Path, out: Path, cache: Path | None = None) -> list[StageStatus]:
    return make_runner(cfg, raw, out, cache, quiet=True).plan()


def tokenize(cfg: RunConfig, raw: Path, out: Path, cache: Path | None = None,
             until: str | None = None, quiet: bool = False) -> dict[str, Path]:
    """Run every stage (or up to `until`); export the shards to <out>/shards. Returns stage dirs.
    Under torchrun every rank calls this: pretokenize splits over the ranks, rank 0 does the
    rest (pipeline/group.py)."""
    group = Group.from_env().join()
    done = make_runner(cfg, raw, out, cache, quiet=quiet, until=until, group=group).run()
    if "shards" in done and group.leader:
        export(done["shards"], out / "shards")
    group.barrier()
    return done


def export(src: Path, dst: Path) -> None:
    """Publish a cached output directory at `dst` as copies (reflinks where the file system has
    them): never hard links, so damage to the export cannot reach the cache.

    Built beside `dst` under a unique temporary name, then swapped in, so `dst` is always complete;
    exporters to the same `dst` take turns (a lock beside it), and each removes the debris of
    killed ones before it starts. An export already equal to `src` (same stage.json, every file
    matching it: pipeline/cache.py) is left as it is."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with key_lock(dst.parent / f".{dst.name}.lock"):
        if _same_export(src, dst):
            return
        for debris in dst.parent.glob(f".{dst.name}.tmp-*"):
            shutil.rmtree(debris, ignore_errors=True)
        for debris in dst.parent.glob(f".{dst.name}.old-*"):
            shutil.rmtree(debris, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
        try:
            shutil.copytree(src, tmp, copy_function=copy_file, dirs_exist_ok=True)
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            if dst.exists():
                os.replace(dst, old)
            os.replace(tmp, dst)
            fsync_dir(dst.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _same_export(src: Path, dst: Path) -> bool:
    record = dst / MANIFEST
    return (record.is_file() and record.read_bytes() == (src / MANIFEST).read_bytes()
            and output_problem(dst) is None)


FICLONE = 0x40049409   # Linux ioctl: share extents copy-on-write (btrfs, xfs, ...)


def copy_file(src: str, dst: str) -> None:
    """A copy of `src` at `dst`: a reflink where the file system supports one, else bytes."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
        except OSError:
            shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())
    shutil.copystat(src, dst)
