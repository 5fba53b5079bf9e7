"""`libero:<suite>/<task>`: the published LIBERO evaluation protocol (needs LIBERO installed).

Per task of a suite (libero_spatial, libero_object, libero_goal, libero_10, libero_90):
- episode `seed` starts from the benchmark's fixed initial state number `seed` (in order, wrapping
  after the last; 50 per task), set on a freshly reset `OffScreenRenderEnv` seeded 0 once;
- the env then takes 10 steps of `[0, 0, 0, 0, 0, 0, -1]` (objects settle) before the policy's
  first action; `reset` returns the observation after them;
- the policy gets at most the suite's step limit (spatial 220, object 280, goal 300, libero_10
  520, libero_90 400), not counting the 10 waiting steps; success is the env's `done`;
- observations: both cameras exactly as LIBERO renders and stores them (bottom-row-first; the
  recipe's `source.rotate_180`, applied by the policy's processor, turns them 180 degrees as the
  published evaluation does); state = eef position ++ axis-angle of the eef quaternion ++ the two
  gripper finger positions (8-d); the task's language instruction.
Executing K actions of a chunk before asking the policy again is the rollout's job (sim.rollout).

LIBERO itself (https://github.com/Lifelong-Robot-Learning/LIBERO, with its scene assets) is not
a dependency and could not be installed here: the `hf-libero` and `libero` pip packages ship the
task specs and initial states but not the assets. The protocol is tested against a stand-in of
LIBERO's API (tests/test_libero_env.py); it has never run against the real simulator here.

    from sim.env import make_env
    from sim.libero_env import task_specs
    for spec in task_specs("libero_goal"):          # "libero:libero_goal/0" ... "/9"
        env = make_env(spec, size=256)
        obs = env.reset(seed=0)                     # initial state 0, after the 10 waiting steps
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.demo_data import quat_to_rotvec
from sim.env import EnvError, Observation, Step, register

os.environ.setdefault("MUJOCO_GL", "egl")

STEP_LIMITS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300,
               "libero_10": 520, "libero_90": 400}
WAIT_STEPS = 10
WAIT_ACTION = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0])
ENV_SEED = 0
INSTALL_HINT = ("install LIBERO from source with its scene assets "
                "(git clone https://github.com/Lifelong-Robot-Learning/LIBERO && pip install -e "
                "LIBERO); the hf-libero / libero pip packages ship task specs and initial states "
                "but no assets")


@dataclass(frozen=True)
class LiberoApi:
    """The parts of LIBERO the protocol uses (the real package, or a stand-in in tests)."""

    benchmarks: dict[str, Callable[[], Any]]    # benchmark.get_benchmark_dict()
    bddl_root: Path                             # get_libero_path("bddl_files")
    assets_root: Path                           # get_libero_path("assets")
    make_env: Callable[..., Any]                # OffScreenRenderEnv(bddl_file_name=, camera_...)


def load_api() -> LiberoApi:
    """LIBERO's API, or one EnvError saying what to install."""
    try:
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv
    except ImportError as exc:
        raise EnvError(f"libero environments need LIBERO ({exc}): {INSTALL_HINT}") from None
    return LiberoApi(benchmarks=benchmark.get_benchmark_dict(),
                     bddl_root=Path(get_libero_path("bddl_files")),
                     assets_root=Path(get_libero_path("assets")), make_env=OffScreenRenderEnv)


def _parse(arg: str | None) -> tuple[str, int]:
    suite, _, task = (arg or "").partition("/")
    if suite not in STEP_LIMITS:
        raise EnvError(f"unknown LIBERO suite {suite!r}; choose one of {', '.join(STEP_LIMITS)} "
                       "as libero:<suite>/<task index>")
    if not task.isdigit():
        raise EnvError(f"libero:{suite}: name a task, libero:{suite}/<index> (sim.libero_env."
                       "task_specs lists them)")
    return suite, int(task)


def _benchmark(api: LiberoApi, suite: str):
    if suite not in api.benchmarks:
        raise EnvError(f"LIBERO has no benchmark {suite!r} (known: {', '.join(api.benchmarks)})")
    return api.benchmarks[suite]()


def task_specs(suite: str, api: LiberoApi | None = None) -> list[str]:
    """`libero:<suite>/<i>` for every task of the suite, in the benchmark's order."""
    _parse(f"{suite}/0")
    bench = _benchmark(api or load_api(), suite)
    return [f"libero:{suite}/{i}" for i in range(bench.get_num_tasks())]


class LiberoEnv:
    """One LIBERO task under the published evaluation protocol (see the module docstring)."""

    action_dim = 7

    def __init__(self, arg: str | None, *, size: int = 256, api: LiberoApi | None = None) -> None:
        suite, index = _parse(arg)
        api = api or load_api()
        bench = _benchmark(api, suite)
        if not 0 <= index < bench.get_num_tasks():
            raise EnvError(f"libero:{suite} has tasks 0..{bench.get_num_tasks() - 1}, not {index}")
        if not api.assets_root.is_dir():
            raise EnvError(f"LIBERO's scene assets are missing ({api.assets_root} does not exist):"
                           f" {INSTALL_HINT}")
        task = bench.get_task(index)
        bddl = api.bddl_root / task.problem_folder / task.bddl_file
        if not bddl.is_file():
            raise EnvError(f"libero:{suite}/{index}: task file {bddl} not found: {INSTALL_HINT}")
        self.name = f"libero:{suite}/{index}"
        self.max_steps = STEP_LIMITS[suite]
        self.instruction = str(task.language)
        self._init_states = np.asarray(bench.get_task_init_states(index))
        self._env = api.make_env(bddl_file_name=str(bddl), camera_heights=size,
                                 camera_widths=size)
        self._env.seed(ENV_SEED)
        self._t: int | None = None

    def reset(self, seed: int) -> Observation:
        """Initial state number `seed` (wrapping), then the 10 waiting steps."""
        self._env.reset()
        obs = self._env.set_init_state(self._init_states[seed % len(self._init_states)])
        for _ in range(WAIT_STEPS):
            obs, _, _, _ = self._env.step(WAIT_ACTION.copy())
        self._t = 0
        return self._observation(obs)

    def step(self, action: np.ndarray) -> Step:
        if self._t is None:
            raise EnvError(f"{self.name}: call reset(seed) before step()")
        if self._t >= self.max_steps:
            raise EnvError(f"{self.name}: the episode ended at its step limit {self.max_steps}; "
                           "call reset(seed)")
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (self.action_dim,) or not np.isfinite(action).all():
            raise EnvError(f"{self.name}: expected a finite ({self.action_dim},) action, got "
                           f"shape {action.shape}")
        obs, _, done, _ = self._env.step(action)
        self._t += 1
        success = bool(done)
        return Step(obs=self._observation(obs), success=success,
                    done=success or self._t >= self.max_steps)

    def expert_action(self) -> np.ndarray:
        raise EnvError(f"{self.name}: LIBERO has no scripted expert (use --policy replay or a "
                       "checkpoint)")

    def close(self) -> None:
        self._env.close()

    def _observation(self, obs: dict) -> Observation:
        state = np.concatenate([obs["robot0_eef_pos"],
                                quat_to_rotvec(np.asarray(obs["robot0_eef_quat"])[None])[0],
                                obs["robot0_gripper_qpos"]]).astype(np.float64)
        return Observation(front=np.ascontiguousarray(obs["agentview_image"], dtype=np.uint8),
                           wrist=np.ascontiguousarray(obs["robot0_eye_in_hand_image"],
                                                      dtype=np.uint8),
                           state=state, instruction=self.instruction)


register("libero", lambda arg, **kwargs: LiberoEnv(arg, **kwargs))
