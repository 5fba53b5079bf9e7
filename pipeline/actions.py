"""Action-chunk transforms shared by fit-bins and the conversation builder (LeRobot recipe).

SPEC.md 1.2: arm actions relative to the current state (`action[t+i] - state[t]`), gripper absolute;
chunks whose whole content is static are dropped (and counted).
"""

from __future__ import annotations

import numpy as np


def relative_dtype(cfg) -> type:
    """The arithmetic of relative actions: float64, or float32 as the published code (compat)."""
    return np.float32 if cfg.compat == "published" else np.float64


def relative_chunk(actions: np.ndarray, states: np.ndarray, t: int, k: int,
                   dims: tuple[int, ...], dtype=np.float64) -> np.ndarray:
    """actions[t:t+k] with `dims` made relative to states[t]; other dims stay absolute.
    The subtraction runs in `dtype` (float32 for the published arithmetic); returns float64."""
    chunk = np.array(actions[t:t + k], dtype=dtype, copy=True)
    if dims:
        idx = list(dims)
        chunk[:, idx] -= np.asarray(states[t, idx], dtype=dtype)
    return chunk.astype(np.float64)


def is_published_static(chunk: np.ndarray) -> bool:
    """The published static rule (SPEC.md 1.2): `sum |relative arm| + |absolute gripper|` over the
    whole chunk is 0. `chunk`: (K, D) as tokenized (arm dims relative, the gripper absolute), so
    a still arm with a moving (or merely closed) gripper is NOT static."""
    return float(np.abs(np.asarray(chunk)).sum()) == 0.0


def is_static_chunk(actions: np.ndarray, states: np.ndarray, t: int, k: int,
                    threshold: float) -> bool:
    """True when every action of the chunk equals the current state within `threshold`
    (the commanded pose never leaves where the robot is: nothing to learn)."""
    chunk = actions[t:t + k]
    d = min(chunk.shape[1], states.shape[1])
    return bool(np.abs(chunk[:, :d] - states[t, :d]).max() < threshold)
