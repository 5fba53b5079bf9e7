"""The in-memory episode every raw reader yields (LIBERO HDF5, LeRobot).

Images stay on disk until asked for, so memory is bounded by one episode's frames at most.
Every array is already in model conventions: states are the model state vector (8-d LIBERO),
images are RGB uint8 (H, W, 3) in TRAINING orientation (the reader applies the 180-degree
rotation exactly once, when `source.rotate_180` is set).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

VIEWS = ("front", "wrist")


@dataclass(frozen=True)
class EpisodeRef:
    """A cheap handle found by scanning: enough to plan work without loading arrays."""

    source: str          # file path relative to the raw root (LIBERO: the .hdf5; LeRobot: parquet)
    key: str             # demo key within the file ("demo_3") or LeRobot "episode_000003"
    task: str            # task name (LIBERO: file stem without "_demo"; LeRobot: task string)
    length: int          # number of recorded steps (rows of `actions`)

    @property
    def episode_id(self) -> str:
        """Stable, file-name-safe id: the parts of "<source without suffix>/<key>" joined by '__'.

        Unique by construction (`id_part` escapes what could fake a separator), and the same as
        the plain join for ordinary names: `libero_10/task_demo.hdf5`, `demo_3` ->
        `libero_10__task_demo__demo_3`."""
        stem = self.source.rsplit(".", 1)[0] if "." in self.source.rsplit("/", 1)[-1] else self.source
        return "__".join(id_part(p) for p in f"{stem}/{self.key}".split("/"))


def id_part(name: str) -> str:
    """One path part of an episode id, escaped so that '__' in the joined id only separates parts:
    '%' -> '%25', then every '_' of a run of two or more, and a leading or trailing '_', -> '%5F'.
    `x/y_demo` gives `x__y_demo`, `x__y_demo` gives `x%5F%5Fy_demo`: never the same id."""
    name = name.replace("%", "%25")
    name = re.sub(r"_{2,}", lambda m: "%5F" * len(m.group()), name)
    return re.sub(r"^_|_$", "%5F", name)


@dataclass
class Episode:
    ref: EpisodeRef
    instruction: str
    actions: np.ndarray      # (T, D) float64, raw units
    states: np.ndarray       # (T_obs, S) float64, model state vector per observation row
    # True for LIBERO raw-release files: obs[t] was recorded AFTER actions[t] ran (SPEC.md 1.1).
    obs_after_action: bool
    # load_frames(view, rows) -> (len(rows), H, W, 3) uint8 in training orientation.
    load_frames: Callable[[str, np.ndarray], np.ndarray] = field(repr=False)
    image_size: tuple[int, int] = (0, 0)   # (H, W) as stored
    meta: dict = field(default_factory=dict)  # flavour, instruction source, fps, ...

    @property
    def episode_id(self) -> str:
        return self.ref.episode_id
