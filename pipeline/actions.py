"""Action-chunk transforms shared by fit-bins and the conversation builder (LeRobot recipe).

SPEC.md 1.2: arm actions relative to the current state (`action[t+i] - state[t]`), gripper absolute;
chunks whose whole content is static are dropped (and counted).
"""

from __future__ import annotations

import numpy as np


def relative_chunk(actions: np.ndarray, states: np.ndarray, t: int, k: int,
                   dims: tuple[int, ...]) -> np.ndarray:
    """actions[t:t+k] with `dims` made relative to states[t]; other dims stay absolute."""
    chunk = np.array(actions[t:t + k], dtype=np.float64, copy=True)
    if dims:
        idx = list(dims)
        chunk[:, idx] -= states[t, idx]
    return chunk


def is_static_chunk(actions: np.ndarray, states: np.ndarray, t: int, k: int,
                    threshold: float) -> bool:
    """True when every action of the chunk equals the current state within `threshold`
    (the commanded pose never leaves where the robot is: nothing to learn)."""
    chunk = actions[t:t + k]
    d = min(chunk.shape[1], states.shape[1])
    return bool(np.abs(chunk[:, :d] - states[t, :d]).max() < threshold)
