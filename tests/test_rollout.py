"""`rynn-pipe rollout`: baselines and a tiny checkpoint in the demo env, statistics, outputs.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_rollout.py -q

The checkpoint is test_policy's (the `test` preset RynnModel saved by the trainer's own `save`,
shards from a 2-task demo suite at 64 px, K=3); one short episode (6 steps: two policy calls).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import ConfigError
from pipeline.io import read_json
from sim.rollout import RolloutConfig, rollout, wilson
from test_policy import build_checkpoint

TIMING = ("wall_s", "policy_s", "latency_ms")


def records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_wilson_interval_by_hand():
    # z = 1.959964, z^2 = 3.841459; 5/10: centre (0.5 + 0.192073) / 1.384146 = 0.5,
    # half 1.959964 sqrt(0.025 + 0.009604) / 1.384146 = 0.263407
    np.testing.assert_allclose(wilson(5, 10), (0.236593, 0.763407), atol=1e-6)
    # 0/10: centre 0.192073 / 1.384146 = 0.138767 = half; 10/10 mirrors it
    np.testing.assert_allclose(wilson(0, 10), (0.0, 0.277533), atol=1e-6)
    np.testing.assert_allclose(wilson(10, 10), (0.722467, 1.0), atol=1e-6)
    # 1/4: centre (0.25 + 0.480182) / 1.960365 = 0.372473,
    # half 1.959964 sqrt(0.046875 + 0.060023) / 1.960365 = 0.326886
    np.testing.assert_allclose(wilson(1, 4), (0.045587, 0.699358), atol=2e-6)
    assert wilson(0, 0) == (0.0, 1.0)


def test_expert_baseline_succeeds_and_writes_everything(tmp_path):
    cfg = RolloutConfig(env="demo", policy="expert", out=tmp_path / "a", episodes=2, seed=1000,
                        videos=2)
    summary = rollout(cfg, quiet=True)
    assert summary["overall"]["episodes"] == 6 and summary["overall"]["success_rate"] == 1.0
    assert len(summary["tasks"]) == 3 and all(t["episodes"] == 2 for t in summary["tasks"].values())
    assert read_json(tmp_path / "a" / "summary.json")["overall"] == summary["overall"]
    rows = records(tmp_path / "a")
    assert [r["seed"] for r in rows] == list(range(1000, 1006))
    videos = sorted((tmp_path / "a" / "videos").iterdir())
    assert [v.name for v in videos] == ["seed-001000.mp4", "seed-001001.mp4"]
    assert all(v.stat().st_size > 1000 for v in videos)
    import av
    with av.open(str(videos[0])) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (256, 128)       # front | wrist
        assert sum(1 for _ in container.decode(stream)) == rows[0]["steps"] + 1
    assert (tmp_path / "a" / "contact_sheet.png").stat().st_size > 0
    # several processes: the same episodes
    rollout(RolloutConfig(env="demo", policy="expert", out=tmp_path / "b", episodes=2,
                          seed=1000, procs=2), quiet=True)
    assert records(tmp_path / "b") == rows


def test_replay_and_mean_baselines(tmp_path, tiny_shards):
    replay = rollout(RolloutConfig(env="demo", policy="replay", out=tmp_path / "r", episodes=1),
                     quiet=True)
    assert replay["overall"]["success_rate"] == 1.0
    mean = rollout(RolloutConfig(env="demo", policy="mean", out=tmp_path / "m", episodes=1,
                                 shards=tiny_shards, env_kwargs={"max_steps": 10}), quiet=True)
    rows = records(tmp_path / "m")
    assert all(r["steps"] == 10 and r["policy_calls"] == 10 // 3 + 1 for r in rows)
    assert mean["overall"]["episodes"] == 3
    with pytest.raises(ConfigError, match="--shards"):
        RolloutConfig(env="demo", policy="mean", out=tmp_path)
    with pytest.raises(ConfigError, match="--mode"):
        RolloutConfig(env="demo", policy="expert", out=tmp_path, mode="fast")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("rollout_ckpt"))


@pytest.mark.parametrize("mode", ["continuous", "discrete"])
def test_checkpoint_rollout_is_reproducible(ckpt, tmp_path, mode):
    run, _ = ckpt
    kwargs = dict(env="demo:1", policy=str(run), episodes=1, seed=7, mode=mode,
                  env_kwargs={"max_steps": 6})
    first = rollout(RolloutConfig(out=tmp_path / "1", **kwargs), quiet=True)
    rollout(RolloutConfig(out=tmp_path / "2", **kwargs), quiet=True)
    rows = records(tmp_path / "1")
    assert rows == records(tmp_path / "2")
    assert rows[0]["steps"] == 6 and rows[0]["policy_calls"] == 2      # K = 3 executed per call
    assert first["overall"]["episodes"] == 1 and first["policy_latency_ms"] > 0


def test_code_cache_encodes_each_frame_once_with_identical_results(ckpt):
    """Re-planning every step (execute=1): the history frames are the previous call's current
    frames; with the cache each frame is encoded once, and the actions are the naive path's."""
    from sim.env import make_env
    from sim.rollout import PolicyAgent, run_episode
    from trainer.policy import Policy
    run, _ = ckpt
    results = {}
    for cache in (8, 0):
        policy = Policy.from_checkpoint(run, device="cpu")
        policy.processor.cache_frames = cache
        env = make_env("demo:1", max_steps=3)
        episode = run_episode(env, PolicyAgent(policy, "continuous", True), 11, execute=1)
        results[cache] = (episode.record["actions_sha256"], policy.processor.encoded)
    assert results[8][0] == results[0][0]
    assert results[8][1] == 2 * 3 and results[0][1] == 2 + 4 * 2    # 3 calls, history from call 2


def test_refusals_come_before_any_episode(tmp_path):
    from pipeline.errors import RynnError
    with pytest.raises(RynnError, match="processor.json"):
        rollout(RolloutConfig(env="demo", policy=str(tmp_path / "nosuch"), out=tmp_path / "o"))
    with pytest.raises(ConfigError, match="neither a shard directory"):
        rollout(RolloutConfig(env="demo", policy="mean", shards=tmp_path, out=tmp_path / "o"))
    with pytest.raises(RynnError, match="unknown environment"):
        rollout(RolloutConfig(env="gym:CartPole", policy="expert", out=tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_malformed_generation_ends_the_episode_not_the_rollout():
    """Unconstrained decoding may fail to parse: that episode fails, with the problems kept."""
    from types import SimpleNamespace
    from sim.env import make_env
    from sim.rollout import PolicyAgent, run_episode
    from trainer.card import MalformedActions

    class Stub:
        card = SimpleNamespace(history=2)

        def act(self, *args, **kwargs):
            raise MalformedActions(["2 well-formed action blocks, expected K=3"], np.zeros(1))

    episode = run_episode(make_env("demo"), PolicyAgent(Stub(), "discrete", False), 0)
    assert episode.record["success"] is False and episode.record["steps"] == 0
    assert episode.record["malformed"] == ["2 well-formed action blocks, expected K=3"]


def test_cli_rollout_and_discrete_act(ckpt, tmp_path):
    from typer.testing import CliRunner
    from pipeline.cli import app
    from sim.demo_data import export_observation
    run, pipe = ckpt
    result = CliRunner().invoke(app, ["rollout", "--env", "demo", "--policy", "expert",
                                      "--episodes", "1", "--seed", "1000", "--out",
                                      str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert read_json(tmp_path / "r" / "summary.json")["overall"]["successes"] == 3
    obs = tmp_path / "obs"
    export_observation(pipe["raw"], obs)
    act = ["act", "--checkpoint", str(run), "--instruction", (obs / "instruction.txt").read_text(),
           "--state", str(obs / "state.npy"), "--front", str(obs / "front.npy"),
           "--wrist", str(obs / "wrist.npy"), "--prev-front", str(obs / "prev_front.npy"),
           "--prev-wrist", str(obs / "prev_wrist.npy"), "--mode", "discrete"]
    for extra in ([], ["--unconstrained"]):
        out = tmp_path / f"actions{len(extra)}.npy"
        result = CliRunner().invoke(app, [*act, *extra, "--out", str(out)])
        if result.exit_code == 0:
            assert np.load(out).shape == (3, 7)
        else:                                     # only plain greedy may be malformed
            assert extra and "malformed" in result.output
    assert np.load(tmp_path / "actions0.npy").shape == (3, 7)
