"""The environment interface that rollouts, experts and demo recording program against.

An environment exposes what the dataset stores and what the model reads, nothing more:

    env = make_env("demo", size=128)            # or "robosuite:Lift", "libero:libero_goal"
    obs = env.reset(seed=3)
    while True:
        step = env.step(action)                 # action: (D,) float64, LIBERO's 7-d convention
        if step.done:
            break
    print(step.success)

Observations hold both cameras exactly as the dataset stores them (for LIBERO-format envs that is
bottom-row-first, like the HDF5 files; the policy's processor applies the recipe's orientation),
the model's state vector and the instruction. `done` is true on success or at the step limit.
This module knows nothing of models or tokens.

Optional, read with getattr by `sim.rollout`: `num_tasks` (default 1; `reset(seed)` then plays
task `seed % num_tasks`, so N episodes per task are N x num_tasks consecutive seeds) and
`recorded_actions()` (the (T, D) actions of the recording the episode's start comes from: the
`replay` baseline).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import numpy as np

from pipeline.errors import RynnError


class EnvError(RynnError):
    """A user-facing environment problem (unknown env, missing package or assets, bad action)."""


@dataclass(frozen=True)
class Observation:
    """One observation: cameras as stored by the dataset, model state, instruction."""

    front: np.ndarray          # (H, W, 3) uint8
    wrist: np.ndarray          # (H, W, 3) uint8
    state: np.ndarray          # (S,) float64, the model state (LIBERO: eef pos ++ axis-angle ++ gripper qpos)
    instruction: str


@dataclass(frozen=True)
class Step:
    """What one `Env.step` returns."""

    obs: Observation
    success: bool              # the task is solved in this state
    done: bool                 # success, or the step limit reached


@runtime_checkable
class Env(Protocol):
    """A seeded, steppable task. Same seed and same actions: the same observations."""

    name: str                  # e.g. "demo", "robosuite:Lift", "libero:libero_goal/3"
    action_dim: int            # D (7 for LIBERO's convention)
    max_steps: int             # the step limit of one episode

    def reset(self, seed: int) -> Observation:
        """Start a new episode, deterministic in `seed`."""
        ...

    def step(self, action: np.ndarray) -> Step:
        """Execute one (D,) action."""
        ...

    def expert_action(self) -> np.ndarray:
        """The scripted solver's next action from privileged simulator state.

        Raises EnvError for envs without a scripted solver.
        """
        ...

    def close(self) -> None:
        ...


def checked_action(name: str, steps: int, max_steps: int, action, action_dim: int) -> np.ndarray:
    """The (D,) float64 action of one step of env `name`, or EnvError: the episode is over, or the
    action has the wrong shape or a non-finite value."""
    if steps >= max_steps:
        raise EnvError(f"{name}: the episode ended at its step limit {max_steps}; call reset(seed)")
    action = np.asarray(action, dtype=np.float64)
    if action.shape != (action_dim,) or not np.isfinite(action).all():
        raise EnvError(f"{name}: expected a finite ({action_dim},) action, got shape "
                       f"{action.shape}")
    return action


EnvFactory = Callable[..., Env]
_REGISTRY: dict[str, EnvFactory] = {}


def register(prefix: str, factory: EnvFactory) -> None:
    """Make `make_env("<prefix>[:<arg>]", ...)` call `factory(arg, **kwargs)`."""
    _REGISTRY[prefix] = factory


def make_env(spec: str, **kwargs) -> Env:
    """Build an environment from its spec string: `demo`, `robosuite:Lift`, `libero:libero_goal`."""
    prefix, _, arg = spec.partition(":")
    if prefix not in _REGISTRY:
        _load_builtin(prefix)
    if prefix not in _REGISTRY:
        raise EnvError(f"unknown environment {spec!r}; known: {', '.join(sorted(_REGISTRY)) or 'none'}"
                       " (specs: demo, robosuite:<Task>, libero:<suite>)")
    return _REGISTRY[prefix](arg or None, **kwargs)


def _load_builtin(prefix: str) -> None:
    """Import the module that registers a built-in prefix (heavy simulators load only when asked)."""
    module = {"demo": "sim.demo_env", "robosuite": "sim.robosuite_env",
              "libero": "sim.libero_env"}.get(prefix)
    if module is not None:
        importlib.import_module(module)
