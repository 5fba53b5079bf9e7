"""`libero:<suite>[/<task>]`: the published LIBERO evaluation protocol (needs LIBERO installed).

Per task of a suite (libero_spatial, libero_object, libero_goal, libero_10, libero_90):
- the task's episodes start from the benchmark's fixed initial states in order (50 per task,
  wrapping after the last), each set on a freshly reset `OffScreenRenderEnv` seeded 0 once;
  `libero:<suite>` plays task `seed % num_tasks` from initial state `seed // num_tasks` (the
  rollout's N episodes per task), `libero:<suite>/<i>` task i from initial state `seed`;
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

    rynn-pipe rollout --env libero:libero_goal --policy runs/goal --episodes 50 --out r/
    from sim.env import make_env
    env = make_env("libero:libero_goal/3", size=256)
    obs = env.reset(seed=0)                     # task 3, initial state 0, after the 10 waits
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sim.demo_data import quat_to_rotvec
from sim.env import EnvError, Observation, Step, checked_action, register

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
        # LIBERO: installed by the user, optional
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv  # LIBERO: installed by the user, optional
    except ImportError as exc:
        raise EnvError(f"libero environments need LIBERO ({exc}): {INSTALL_HINT}") from None
    return LiberoApi(benchmarks=benchmark.get_benchmark_dict(),
                     bddl_root=Path(get_libero_path("bddl_files")),
                     assets_root=Path(get_libero_path("assets")), make_env=OffScreenRenderEnv)


def _parse(arg: str | None) -> tuple[str, int | None]:
    suite, _, task = (arg or "").partition("/")
    if suite not in STEP_LIMITS:
        raise EnvError(f"unknown LIBERO suite {suite!r}; choose one of {', '.join(STEP_LIMITS)} "
                       "as libero:<suite> or libero:<suite>/<task index>")
    if task and not task.isdigit():
        raise EnvError(f"libero:{suite}/{task}: the task is an index, libero:{suite}/<index>")
    return suite, int(task) if task else None


def _benchmark(api: LiberoApi, suite: str):
    if suite not in api.benchmarks:
        raise EnvError(f"LIBERO has no benchmark {suite!r} (known: {', '.join(api.benchmarks)})")
    return api.benchmarks[suite]()


def task_specs(suite: str, api: LiberoApi | None = None) -> list[str]:
    """`libero:<suite>/<i>` for every task of the suite, in the benchmark's order."""
    _parse(suite)
    bench = _benchmark(api or load_api(), suite)
    return [f"libero:{suite}/{i}" for i in range(bench.get_num_tasks())]


class LiberoEnv:
    """A LIBERO suite (`num_tasks` tasks) or one of its tasks under the published evaluation
    protocol (see the module docstring). Seed s plays task `s % num_tasks` from that task's
    initial state number `s // num_tasks`, so N episodes per task are N x num_tasks consecutive
    seeds and each task sees its initial states in order. One task's simulator is held at a time
    (built again when the task changes)."""

    action_dim = 7

    def __init__(self, arg: str | None, *, size: int = 256, api: LiberoApi | None = None) -> None:
        self.suite, index = _parse(arg)
        self._api = api or load_api()
        self._bench = _benchmark(self._api, self.suite)
        count = self._bench.get_num_tasks()
        if index is not None and not 0 <= index < count:
            raise EnvError(f"libero:{self.suite} has tasks 0..{count - 1}, not {index}")
        if not self._api.assets_root.is_dir():
            raise EnvError(f"LIBERO's scene assets are missing ({self._api.assets_root} does not "
                           f"exist): {INSTALL_HINT}")
        self._tasks = list(range(count)) if index is None else [index]
        self.num_tasks = len(self._tasks)
        self.name = f"libero:{arg}"
        self.max_steps = STEP_LIMITS[self.suite]
        self.size = size
        self._task: int | None = None
        self._env = None
        self._t: int | None = None
        self._load(self._tasks[0])

    def _load(self, index: int) -> None:
        """Hold task `index`'s simulator (seeded once, as the published evaluation does)."""
        if self._task == index:
            return
        task = self._bench.get_task(index)
        bddl = self._api.bddl_root / task.problem_folder / task.bddl_file
        if not bddl.is_file():
            raise EnvError(f"libero:{self.suite}/{index}: task file {bddl} not found: "
                           f"{INSTALL_HINT}")
        if self._env is not None:
            self._env.close()
        self._env = self._api.make_env(bddl_file_name=str(bddl), camera_heights=self.size,
                                       camera_widths=self.size)
        self._env.seed(ENV_SEED)
        self._task, self.instruction = index, str(task.language)
        self._init_states = np.asarray(self._bench.get_task_init_states(index))

    def reset(self, seed: int) -> Observation:
        """Task `seed % num_tasks`, its initial state `seed // num_tasks` (wrapping after the
        last), then the 10 waiting steps."""
        self._load(self._tasks[seed % self.num_tasks])
        self._env.reset()
        number = (seed // self.num_tasks) % len(self._init_states)
        obs = self._env.set_init_state(self._init_states[number])
        for _ in range(WAIT_STEPS):
            obs, _, _, _ = self._env.step(WAIT_ACTION.copy())
        self._t = 0
        return self._observation(obs)

    def step(self, action: np.ndarray) -> Step:
        if self._t is None:
            raise EnvError(f"{self.name}: call reset(seed) before step()")
        action = checked_action(self.name, self._t, self.max_steps, action, self.action_dim)
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
