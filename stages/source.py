"""Raw-format detection and dispatch: a LIBERO HDF5 directory, a LeRobot v2.1 or v3.0 dataset.

Each reader module (`stages.libero`, `stages.lerobot`) provides:
    detect(root) -> bool
    scan(root, cfg: SourceConfig) -> list[EpisodeRef]        # cheap, sorted, deterministic
    load(root, ref, cfg: SourceConfig) -> Episode             # one episode; images stay lazy
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from pipeline.config import SourceConfig
from pipeline.episode import Episode, EpisodeRef
from pipeline.errors import DataError

READERS = {"libero": "stages.libero", "lerobot": "stages.lerobot"}


def reader(root: Path, cfg: SourceConfig) -> ModuleType:
    if not root.exists():
        raise DataError(f"raw data directory does not exist: {root}", file=str(root))
    if cfg.format != "auto":
        return importlib.import_module(READERS[cfg.format])
    for name in ("lerobot", "libero"):
        mod = importlib.import_module(READERS[name])
        if mod.detect(root):
            return mod
    raise DataError(
        f"no known raw format in {root}: expected LIBERO HDF5 files (*.hdf5 with data/demo_*) or a "
        "LeRobot dataset (meta/info.json with codebase_version v2.1 or v3.0)", file=str(root))


def format_name(root: Path, cfg: SourceConfig) -> str:
    return reader(root, cfg).__name__.rsplit(".", 1)[-1]


def scan(root: Path, cfg: SourceConfig) -> list[EpisodeRef]:
    refs = reader(root, cfg).scan(root, cfg)
    check_unique_ids(refs)
    return refs


def check_unique_ids(refs: list[EpisodeRef]) -> None:
    """Two episodes mapping to one id (`x/y_demo.hdf5` and `x__y_demo.hdf5`) would mix their
    arrays and codes: an error naming both files."""
    seen: dict[str, EpisodeRef] = {}
    for ref in refs:
        other = seen.setdefault(ref.episode_id, ref)
        if other is not ref:
            raise DataError(f"{other.source} ({other.key}) and {ref.source} ({ref.key}) map to the "
                            f"same episode id {ref.episode_id!r}; rename one of the files",
                            file=ref.source, episode=ref.episode_id)


def load(root: Path, ref: EpisodeRef, cfg: SourceConfig) -> Episode:
    return reader(root, cfg).load(root, ref, cfg)
