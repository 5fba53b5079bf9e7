"""The LIBERO evaluation protocol (sim/libero_env.py) against a stand-in of LIBERO's API.

LIBERO's simulator (with its scene assets) cannot be installed here, so `FakeOffScreenEnv` below is
a test double of its `OffScreenRenderEnv` (seed / reset / set_init_state / step / close, the
observation keys it returns, `done` = success) and `FakeBenchmark` of its benchmark objects. They
record every call so the tests can check the protocol: initial states in order, the 10 waiting
steps, the state vector, the step limits, success from the env, and the errors.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_libero_env.py -q
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from sim.env import EnvError, make_env
from sim.libero_env import STEP_LIMITS, LiberoApi, LiberoEnv, load_api, task_specs

SUCCESS_AFTER = 5      # the fake env reports success after this many non-waiting actions


class FakeOffScreenEnv:
    """Stand-in for libero.libero.envs.OffScreenRenderEnv."""

    instances: list["FakeOffScreenEnv"] = []

    def __init__(self, *, bddl_file_name: str, camera_heights: int, camera_widths: int) -> None:
        self.bddl, self.size = bddl_file_name, (camera_heights, camera_widths)
        self.calls: list[tuple] = []
        self.state = None
        self.moves = 0
        FakeOffScreenEnv.instances.append(self)

    def seed(self, seed: int) -> None:
        self.calls.append(("seed", seed))

    def reset(self):
        self.calls.append(("reset",))
        self.state, self.moves = None, 0
        return self._obs()

    def set_init_state(self, state):
        self.calls.append(("set_init_state", np.asarray(state).copy()))
        self.state = np.asarray(state, dtype=float)
        return self._obs()

    def step(self, action):
        action = np.asarray(action)
        self.calls.append(("step", action.copy()))
        if not np.array_equal(action, [0, 0, 0, 0, 0, 0, -1]):
            self.moves += 1
        return self._obs(), 0.0, self.moves >= SUCCESS_AFTER, {}

    def close(self) -> None:
        self.calls.append(("close",))

    def _obs(self) -> dict:
        h, w = self.size
        frame = np.full((h, w, 3), len(self.calls) % 256, np.uint8)
        frame[0, 0] = (1, 2, 3)                       # marks row 0 as LIBERO renders it
        half = np.pi / 4                              # quaternion (x, y, z, w): 90 deg about z
        return {"agentview_image": frame, "robot0_eye_in_hand_image": frame + 1,
                "robot0_eef_pos": np.array([0.1, 0.2, 0.3]) + (self.state[0] if self.state
                                                               is not None else 0.0),
                "robot0_eef_quat": np.array([0.0, 0.0, np.sin(half), np.cos(half)]),
                "robot0_gripper_qpos": np.array([0.04, -0.04])}


class FakeBenchmark:
    def __init__(self, n_tasks: int = 3, n_states: int = 4) -> None:
        self.n_tasks, self.n_states = n_tasks, n_states

    def get_num_tasks(self) -> int:
        return self.n_tasks

    def get_task(self, i: int):
        return SimpleNamespace(language=f"task number {i}", problem_folder="libero_goal",
                               bddl_file=f"task_{i}.bddl")

    def get_task_init_states(self, i: int) -> np.ndarray:
        return np.arange(self.n_states, dtype=float)[:, None] * 10 + i + np.zeros((1, 5))


@pytest.fixture
def api(tmp_path) -> LiberoApi:
    FakeOffScreenEnv.instances.clear()
    (tmp_path / "bddl" / "libero_goal").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "bddl" / "libero_goal" / f"task_{i}.bddl").write_text("(define)")
    (tmp_path / "assets").mkdir()
    return LiberoApi(benchmarks={s: FakeBenchmark for s in STEP_LIMITS},
                     bddl_root=tmp_path / "bddl", assets_root=tmp_path / "assets",
                     make_env=FakeOffScreenEnv)


def steps(env: FakeOffScreenEnv) -> list[np.ndarray]:
    return [c[1] for c in env.calls if c[0] == "step"]


def test_reset_sets_initial_states_in_order_then_waits_ten_steps(api):
    env = LiberoEnv("libero_goal/2", size=64, api=api)
    fake = FakeOffScreenEnv.instances[0]
    assert fake.bddl == str(api.bddl_root / "libero_goal" / "task_2.bddl")
    assert fake.size == (64, 64) and fake.calls == [("seed", 0)]
    inits = FakeBenchmark().get_task_init_states(2)
    for seed in (0, 1, 2, 3, 4):
        fake.calls.clear()
        env.reset(seed)
        assert [c[0] for c in fake.calls] == ["reset", "set_init_state"] + ["step"] * 10
        np.testing.assert_array_equal(fake.calls[1][1], inits[seed % 4])   # 4 states: wraps
        for action in steps(fake):
            np.testing.assert_array_equal(action, [0, 0, 0, 0, 0, 0, -1])


def test_suite_env_plays_each_task_from_its_initial_states_in_order(api):
    env = LiberoEnv("libero_goal", size=32, api=api)
    assert env.num_tasks == 3 and env.max_steps == 300
    played = []
    for seed in range(6):                          # N = 2 episodes per task: seeds 0..5
        obs = env.reset(seed)
        fake = FakeOffScreenEnv.instances[-1]
        state = [c[1] for c in fake.calls if c[0] == "set_init_state"][-1]
        played.append((Path(fake.bddl).name, obs.instruction, int(state[0])))
    assert played == [("task_0.bddl", "task number 0", 0), ("task_1.bddl", "task number 1", 1),
                      ("task_2.bddl", "task number 2", 2), ("task_0.bddl", "task number 0", 10),
                      ("task_1.bddl", "task number 1", 11), ("task_2.bddl", "task number 2", 12)]
    # one simulator held at a time: each earlier one was closed when the task changed
    assert all(("close",) in f.calls for f in FakeOffScreenEnv.instances[:-1])
    assert all(f.calls[0] == ("seed", 0) for f in FakeOffScreenEnv.instances)


def test_observation_state_and_frames(api):
    env = LiberoEnv("libero_goal/1", size=32, api=api)
    obs = env.reset(3)
    # eef pos (shifted by the fake's initial state 31) ++ axis-angle of 90 deg about z ++ gripper
    np.testing.assert_allclose(obs.state, [31.1, 31.2, 31.3, 0.0, 0.0, np.pi / 2, 0.04, -0.04])
    assert obs.instruction == "task number 1"
    assert obs.front.shape == (32, 32, 3) and tuple(obs.front[0, 0]) == (1, 2, 3)   # unrotated
    assert tuple(obs.wrist[0, 0]) == (2, 3, 4)


def test_success_comes_from_the_env(api):
    env = LiberoEnv("libero_spatial/0", api=api)
    env.reset(0)
    results = [env.step(np.full(7, 0.5)) for _ in range(SUCCESS_AFTER)]
    assert [r.success for r in results] == [False] * (SUCCESS_AFTER - 1) + [True]
    assert results[-1].done and not results[-2].done


@pytest.mark.parametrize("suite,limit", [("libero_spatial", 220), ("libero_object", 280),
                                         ("libero_goal", 300), ("libero_10", 520),
                                         ("libero_90", 400)])
def test_step_limit_per_suite_excludes_the_waiting_steps(api, suite, limit):
    env = LiberoEnv(f"{suite}/0", api=api)
    assert env.max_steps == limit
    env.reset(0)
    wait = [0, 0, 0, 0, 0, 0, -1]                     # never succeeds in the fake
    done = [env.step(np.array(wait, float)).done for _ in range(limit)]
    assert done == [False] * (limit - 1) + [True]
    assert len(steps(FakeOffScreenEnv.instances[-1])) == limit + 10
    with pytest.raises(EnvError, match=f"step limit {limit}"):
        env.step(np.zeros(7))


def test_task_specs_and_bad_names(api):
    assert task_specs("libero_goal", api) == [f"libero:libero_goal/{i}" for i in range(3)]
    with pytest.raises(EnvError, match="unknown LIBERO suite 'libero_long'"):
        LiberoEnv("libero_long/0", api=api)
    with pytest.raises(EnvError, match="the task is an index"):
        LiberoEnv("libero_goal/x", api=api)
    with pytest.raises(EnvError, match="tasks 0..2, not 7"):
        LiberoEnv("libero_goal/7", api=api)
    with pytest.raises(EnvError, match="no scripted expert"):
        LiberoEnv("libero_goal/0", api=api).expert_action()


def test_missing_assets_is_one_clear_error(api, tmp_path):
    api = LiberoApi(benchmarks=api.benchmarks, bddl_root=api.bddl_root,
                    assets_root=tmp_path / "nowhere", make_env=FakeOffScreenEnv)
    with pytest.raises(EnvError, match="scene assets are missing .*git clone"):
        LiberoEnv("libero_goal/0", api=api)


def test_missing_package_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "libero", None)
    with pytest.raises(EnvError, match="need LIBERO .*install LIBERO from source"):
        load_api()
    with pytest.raises(EnvError, match="install LIBERO from source"):
        make_env("libero:libero_goal/0")
