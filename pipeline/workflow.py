"""Library functions behind the commands: resolve a config, run or plan the data pipeline, export.

    from pipeline.workflow import resolve_config, tokenize
    stage_dirs = tokenize(resolve_config("demo"), raw=Path("demos"), out=Path("out/demo"))
    # the shard set is exported to out/demo/shards (a link to its current version; pipeline/publish.py)
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.config import RunConfig, apply_overrides, recipe
from pipeline.errors import RynnError
from pipeline.group import Group
from pipeline.publish import export
from pipeline.runner import Runner, StageStatus
from stages.registry import pipeline


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
