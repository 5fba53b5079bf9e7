"""The `demo` environment: one simulation with the demo suite's writer, a scripted expert.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_demo_env.py -q
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from conftest import SUITE
from sim.demo_data import task_list
from sim.demo_env import DemoEnv
from sim.env import Env, EnvError, make_env


def suite_env() -> DemoEnv:
    return DemoEnv(SUITE["tasks"], size=SUITE["size"], data_seed=SUITE["seed"])


def test_expert_succeeds_on_20_seeds():
    env = make_env("demo")
    assert isinstance(env, Env) and env.num_tasks == 3
    instructions = set()
    for seed in range(20):
        obs = env.reset(seed)
        instructions.add(obs.instruction)
        step = None
        while step is None or not step.done:
            step = env.step(env.expert_action())
        assert step.success, f"seed {seed}: the expert failed after {env.steps} steps"
        assert env.steps < env.max_steps
    assert len(instructions) == 3


def recorded(path, key: str) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        demo = f["data"][key]
        obs = demo["obs"]
        return {"actions": demo["actions"][()], "front": obs["agentview_rgb"][()],
                "wrist": obs["eye_in_hand_rgb"][()],
                "state": np.concatenate([obs["ee_pos"][()], obs["ee_ori"][()],
                                         obs["gripper_states"][()]], 1)}


@pytest.mark.parametrize("number", [0, 2])
def test_recorded_actions_reproduce_the_recorded_frames(demo_suite, number):
    """raw flavour: obs[t] is recorded after actions[t], so step t returns exactly frame t."""
    env = suite_env()
    for task in task_list(SUITE["tasks"]):
        demo = recorded(demo_suite / task.file_name("raw"), f"demo_{number}")
        obs = env.reset(number * SUITE["tasks"] + task.index)
        assert obs.instruction == task.instruction
        np.testing.assert_array_equal(env.recorded_actions(), demo["actions"])
        for t, action in enumerate(demo["actions"]):
            step = env.step(action)
            np.testing.assert_array_equal(step.obs.front, demo["front"][t], err_msg=f"front {t}")
            np.testing.assert_array_equal(step.obs.wrist, demo["wrist"][t], err_msg=f"wrist {t}")
            np.testing.assert_allclose(step.obs.state, demo["state"][t], rtol=0, atol=1e-12)
        assert step.success                           # the demo ends with the block on the plate


def test_reset_observation_is_the_first_regenerated_frame(demo_suite_regen):
    """regenerated flavour: obs[t] is recorded before actions[t]; reset gives frame 0."""
    env = suite_env()
    task = task_list(SUITE["tasks"])[1]
    demo = recorded(demo_suite_regen / task.file_name("regenerated"), "demo_0")
    obs = env.reset(task.index)
    np.testing.assert_array_equal(obs.front, demo["front"][0])
    np.testing.assert_array_equal(obs.wrist, demo["wrist"][0])
    assert obs.front.shape == (SUITE["size"], SUITE["size"], 3) and obs.state.shape == (8,)


def test_episode_limits_and_bad_input():
    env = DemoEnv(max_steps=2)
    with pytest.raises(EnvError, match="reset"):
        env.step(np.zeros(7))
    env.reset(0)
    with pytest.raises(EnvError, match=r"\(7,\) action"):
        env.step(np.zeros(6))
    with pytest.raises(EnvError, match=r"\(7,\) action"):
        env.step(np.array([np.nan] * 7))
    assert not env.step(np.zeros(7)).done
    assert env.step(np.zeros(7)).done
    with pytest.raises(EnvError, match="step limit 2"):
        env.step(np.zeros(7))
    with pytest.raises(EnvError, match="unknown environment"):
        make_env("nosuch:Thing")
    with pytest.raises(EnvError, match="demo:<tasks>"):
        make_env("demo:Lift")
    assert make_env("demo:5").num_tasks == 5


def test_expert_regrasps_after_a_missed_grasp():
    env = DemoEnv()
    env.reset(4)
    while env.body.pos[2] > 0.06:                      # on its way down to the block
        env.step(env.expert_action())
    for _ in range(3):                                 # close too early: the grasp misses
        env.step(np.array([0.0] * 6 + [1.0]))
    assert not env.body.held and env.body.finger < 0.01
    step = None
    while step is None or not step.done:
        step = env.step(env.expert_action())
    assert step.success
