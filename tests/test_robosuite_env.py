"""robosuite environments (sim/robosuite_env.py) and real-physics demo recording (sim/record.py).

The simulator tests need the optional extra (`pip install -e '.[sim]'` plus Mesa EGL) and are
skipped, with that reason, where robosuite is not installed; the error-path tests run everywhere.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_robosuite_env.py -q
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import h5py
import numpy as np
import pytest

from pipeline.config import SourceConfig
from sim.demo_data import quat_to_rotvec
from sim.env import EnvError, make_env

SIZE = 64          # small frames keep the tests fast; the recipe uses 128


@pytest.fixture(scope="module")
def robosuite():
    return pytest.importorskip("robosuite", reason="robosuite is not installed (the optional "
                               "extra: pip install -e '.[sim]')")


@pytest.fixture(scope="module")
def lift(robosuite):
    env = make_env("robosuite:Lift", size=SIZE)
    yield env
    env.close()


def run_expert(env, seed: int, steps: int | None = None):
    obs, step, n = env.reset(seed), None, 0
    while (step is None or not step.done) and (steps is None or n < steps):
        step = env.step(env.expert_action())
        n += 1
    return obs, step, n


def test_missing_robosuite_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "robosuite", None)     # `import robosuite` raises ImportError
    with pytest.raises(EnvError, match=r"pip install -e '\.\[sim\]'.*libegl1"):
        make_env("robosuite:Lift")


def test_unknown_task_names_the_known_ones():
    with pytest.raises(EnvError, match="robosuite:Lift, robosuite:Stack, robosuite:PickPlaceCan"):
        make_env("robosuite:Door")


def test_expert_lifts_the_cube(lift):
    results = [run_expert(lift, seed) for seed in range(3)]
    assert [step.success for _, step, _ in results] == [True] * 3
    assert all(n < lift.max_steps for _, _, n in results)


def test_observation_is_what_libero_stores(lift):
    obs = lift.reset(seed=4)
    rs = lift._env
    assert obs.front.shape == obs.wrist.shape == (SIZE, SIZE, 3) and obs.front.dtype == np.uint8
    # MuJoCo's read_pixels is bottom-row-first (OpenGL); the env hands frames on unflipped.
    raw = rs.sim.render(camera_name="agentview", width=SIZE, height=SIZE)
    np.testing.assert_array_equal(obs.front, raw)
    o = rs._get_observations(force_update=True)
    expected = np.concatenate([o["robot0_eef_pos"], quat_to_rotvec(o["robot0_eef_quat"][None])[0],
                               o["robot0_gripper_qpos"]])
    np.testing.assert_allclose(obs.state, expected)
    assert obs.state.shape == (8,) and obs.instruction == "lift the red cube"


def test_same_seed_same_episode(lift):
    a = [lift.reset(seed=7)] + [lift.step(lift.expert_action()).obs for _ in range(5)]
    lift.reset(seed=8)                                       # soft reset in between
    b = [lift.reset(seed=7)] + [lift.step(lift.expert_action()).obs for _ in range(5)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.front, y.front)
        np.testing.assert_array_equal(x.wrist, y.wrist)
        np.testing.assert_array_equal(x.state, y.state)
    assert not np.array_equal(lift.reset(seed=8).state, a[0].state)


def test_bad_action_and_step_limit(robosuite):
    env = make_env("robosuite:Lift", size=32, max_steps=2)
    try:
        with pytest.raises(EnvError, match="before step"):
            env.step(np.zeros(7))
        env.reset(seed=0)
        with pytest.raises(EnvError, match=r"finite \(7,\) action"):
            env.step(np.full(7, np.nan))
        assert not env.step(np.zeros(7)).done
        assert env.step(np.zeros(7)).done
        with pytest.raises(EnvError, match="step limit 2"):
            env.step(np.zeros(7))
    finally:
        env.close()


@pytest.mark.slow
@pytest.mark.parametrize("task", ["Stack", "PickPlaceCan"])
def test_expert_solves_stack_and_can(robosuite, task):
    env = make_env(f"robosuite:{task}", size=32)
    try:
        assert [run_expert(env, seed)[1].success for seed in range(2)] == [True, True]
    finally:
        env.close()


# ---------------------------------------------------------------------------------------------
# sim-data
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def recorded(robosuite, tmp_path_factory):
    from sim.record import RecordConfig, record_demos
    cfg = RecordConfig(env="robosuite:Lift", episodes=2, seed=3, size=SIZE, noise=0.05)
    out = tmp_path_factory.mktemp("sim_data")
    return cfg, record_demos(out / "a", cfg), out


def test_sim_data_is_read_by_the_libero_reader(recorded, lift):
    from stages import libero
    cfg, result, _ = recorded
    root = result.path.parent
    refs = libero.scan(root, SourceConfig())
    assert [r.key for r in refs] == ["demo_0", "demo_1"] and result.kept_seeds == [3, 4]
    unrotated = replace(SourceConfig(), rotate_180=False)
    ep = libero.load(root, refs[0], unrotated)
    assert ep.instruction == "lift the red cube" and ep.obs_after_action
    assert ep.meta["flavour"] == "raw" and ep.image_size == (SIZE, SIZE)
    # Replaying the recorded actions from the same seed gives the recorded observations (after
    # each action), frames stored exactly as the env returns them.
    lift.reset(seed=result.kept_seeds[0])
    frames = ep.load_frames("front", np.arange(3))
    for t in range(3):
        obs = lift.step(ep.actions[t]).obs
        np.testing.assert_array_equal(frames[t], obs.front)
        np.testing.assert_allclose(ep.states[t], obs.state)
    with h5py.File(result.path) as f:
        data = f["data"]
        assert json.loads(data.attrs["problem_info"])["language_instruction"] == ep.instruction
        assert json.loads(data.attrs["env_args"])["env_name"] == "Lift"
        assert data.attrs["num_demos"] == 2 and data.attrs["total"] == result.steps
        demo = data["demo_0"]
        assert demo.attrs["model_file"].startswith("<mujoco") and demo["rewards"][-1] == 1
        assert demo.attrs["init_state"].shape == demo["states"].shape[1:]


def test_sim_data_is_deterministic(recorded):
    from pipeline.io import sha256_file
    from sim.record import record_demos
    cfg, result, out = recorded
    again = record_demos(out / "b", cfg)
    assert sha256_file(again.path) == sha256_file(result.path)


def test_sim_data_cli_rejects_bad_arguments_in_one_line(tmp_path):
    from typer.testing import CliRunner
    from pipeline.cli import app
    result = CliRunner().invoke(app, ["sim-data", str(tmp_path / "out"), "--episodes", "0"])
    assert result.exit_code == 2 and "sim-data --episodes: must be >= 1" in result.output
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, ["sim-data", str(tmp_path / "out"), "--env", "libero:x"])
    assert result.exit_code == 1 and "unknown LIBERO suite 'x'" in result.output
