"""The in-memory episode every raw reader yields (LIBERO HDF5, LeRobot).

Images stay on disk until asked for, so memory is bounded by one episode's frames at most.
Every array is already in model conventions: states are the model state vector (8-d LIBERO),
images are RGB uint8 (H, W, 3) in TRAINING orientation (the reader applies the 180-degree
rotation exactly once, when `source.rotate_180` is set).
"""

from __future__ import annotations

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
        """Unique, stable, file-name-safe id: "<source without suffix>/<key>" with '/' -> '__'."""
        stem = self.source.rsplit(".", 1)[0] if "." in self.source.rsplit("/", 1)[-1] else self.source
        return f"{stem}/{self.key}".replace("/", "__")


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
