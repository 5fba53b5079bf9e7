"""The no-op rule, obs/action pairing and the `filter` stage on hand-built episodes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import base
from sim.demo_data import write_demo_suite
from pipeline.episode import Episode, EpisodeRef
from pipeline.errors import DataError, StageError
from pipeline.io import load_npz, read_json
from pipeline.runner import MANIFEST, Runner
from stages import filter as filt
from stages import fit_bins, source
from shards.bins import Stats
from stages.filter import noop_keep_mask, pair_steps
from stages.libero import load

MOVE = [0.1, 0.0, 0.0, 0.0, 0.0, 0.0]
IDLE = [0.0] * 6


def acts(*steps: tuple[list[float], float]) -> np.ndarray:
    return np.array([[*motion, grip] for motion, grip in steps])


def reference_mask(actions: np.ndarray, threshold: float = 1e-4) -> np.ndarray:
    """SPEC.md 2 written as the obvious loop, to check the vectorized rule against."""
    keep, last = [], None
    for a in actions:
        small = np.linalg.norm(a[:6]) < threshold
        noop = small if last is None else small and a[-1] == last
        keep.append(not noop)
        last = last if noop else a[-1]
    return np.array(keep)


# ---------------------------------------------------------------------------------------------
# noop_keep_mask
# ---------------------------------------------------------------------------------------------

def test_first_step_with_tiny_norm_is_dropped():
    a = acts((IDLE, -1.0), (MOVE, -1.0))
    assert noop_keep_mask(a).tolist() == [False, True]


def test_first_step_only_norm_applies_even_with_a_gripper_value():
    a = acts((IDLE, 1.0), (IDLE, -1.0), (MOVE, -1.0))
    # step 0: tiny norm, nothing kept before -> dropped whatever its gripper; step 1 likewise.
    assert noop_keep_mask(a).tolist() == [False, False, True]


def test_idle_motion_with_gripper_change_is_kept():
    a = acts((MOVE, -1.0), (IDLE, 1.0), (IDLE, 1.0), (IDLE, -1.0))
    assert noop_keep_mask(a).tolist() == [True, True, False, True]


def test_gripper_compared_with_last_kept_not_last_seen():
    # step 1 changes the gripper w.r.t. the last SEEN step (0), but step 0 was dropped and nothing
    # is kept yet: step 1 is dropped too. Steps 3-4 repeat the last KEPT gripper (-1): dropped.
    a = acts((IDLE, 1.0), (IDLE, -1.0), (MOVE, -1.0), (IDLE, -1.0), (IDLE, -1.0), (IDLE, 1.0),
             (IDLE, 1.0), (IDLE, -1.0))
    assert noop_keep_mask(a).tolist() == [False, False, True, False, False, True, False, True]
    assert reference_mask(a).tolist() == noop_keep_mask(a).tolist()


def test_threshold_boundary_is_strict():
    at = acts((MOVE, -1.0), ([1e-4, 0, 0, 0, 0, 0], -1.0), ([0.99e-4, 0, 0, 0, 0, 0], -1.0))
    assert noop_keep_mask(at, threshold=1e-4).tolist() == [True, True, False]


def test_vectorized_rule_matches_the_loop():
    rng = np.random.default_rng(0)
    for _ in range(50):
        t = int(rng.integers(1, 30))
        motion = rng.normal(size=(t, 6)) * (rng.random((t, 1)) < 0.5)
        grip = rng.choice([-1.0, 1.0], size=(t, 1))
        a = np.hstack([motion, grip])
        assert noop_keep_mask(a).tolist() == reference_mask(a).tolist()


# ---------------------------------------------------------------------------------------------
# pair_steps
# ---------------------------------------------------------------------------------------------

def test_pairing_regenerated_flavour_uses_same_row():
    obs, act, dropped = pair_steps(np.array([True, False, True, True]), obs_after_action=False)
    assert obs.tolist() == [0, 2, 3] and act.tolist() == [0, 2, 3]
    assert dropped == {"noop": 1, "no_prior_observation": 0}


def test_pairing_raw_flavour_uses_previous_row_and_drops_action_zero():
    obs, act, dropped = pair_steps(np.array([True, False, True, True]), obs_after_action=True)
    assert act.tolist() == [2, 3] and obs.tolist() == [1, 2]
    assert dropped == {"noop": 1, "no_prior_observation": 1}


def test_pairing_raw_flavour_when_action_zero_is_a_noop():
    obs, act, dropped = pair_steps(np.array([False, True, True]), obs_after_action=True)
    assert act.tolist() == [1, 2] and obs.tolist() == [0, 1]
    assert dropped == {"noop": 1, "no_prior_observation": 0}
    assert obs.dtype == np.int64 and act.dtype == np.int64


# ---------------------------------------------------------------------------------------------
# The stage (source.scan/load replaced by hand-built episodes)
# ---------------------------------------------------------------------------------------------

def make_episode(task: str, demo: int, actions: np.ndarray, after: bool) -> Episode:
    t = len(actions)
    ref = EpisodeRef(source=f"{task}_demo.hdf5", key=f"demo_{demo}", task=task, length=t)
    states = np.arange(t * 8, dtype=np.float64).reshape(t, 8)
    return Episode(ref=ref, instruction=task.replace("_", " "), actions=actions, states=states,
                   obs_after_action=after, load_frames=lambda view, rows: None,
                   image_size=(16, 16), meta={"flavour": "raw" if after else "regenerated",
                                              "instruction_source": "filename"})


def steps(n_idle: int, n_move: int) -> np.ndarray:
    return acts(*[(IDLE, -1.0)] * n_idle, *[(MOVE, -1.0)] * n_move)


@pytest.fixture()
def fake_source(monkeypatch):
    episodes: dict[str, Episode] = {}
    monkeypatch.setattr(source, "scan", lambda root, cfg: [e.ref for e in episodes.values()])
    monkeypatch.setattr(source, "load", lambda root, ref, cfg: episodes[ref.episode_id])
    monkeypatch.setattr(source, "format_name", lambda root, cfg: "libero")
    return episodes


def run_stage(tmp_path: Path, cfg=None, out: str = "out"):
    ctx = filt.STAGE.context(cfg or base(), raw=tmp_path, inputs={}, out=tmp_path / out, quiet=True)
    return filt.run(ctx), ctx.out


def add(episodes: dict, *eps: Episode) -> None:
    for e in eps:
        episodes[e.episode_id] = e


def test_stage_writes_episode_files_and_counts(tmp_path, fake_source):
    add(fake_source, make_episode("put_bowl", 10, steps(2, 4), after=True),
        make_episode("put_bowl", 9, steps(1, 5), after=False),
        make_episode("open_door", 0, steps(0, 3), after=True))
    result, out = run_stage(tmp_path)
    assert result.counts == {
        "episodes": 3, "in": 15, "out": 11,
        "dropped": {"noop": 3, "no_prior_observation": 1},
        "dropped_by_task": {"open_door": {"noop": 0, "no_prior_observation": 1},
                            "put_bowl": {"noop": 3, "no_prior_observation": 0}}}
    index = read_json(out / "episodes.json")
    assert [r["key"] for r in index["episodes"]] == ["demo_0", "demo_9", "demo_10"]
    row = index["episodes"][2]
    assert row["n_raw"] == 6 and row["n_kept"] == 4
    assert row["file"] == "ep/put_bowl_demo__demo_10.npz"
    data = load_npz(out / row["file"])
    assert data["action_index"].tolist() == [2, 3, 4, 5]
    assert data["obs_index"].tolist() == [1, 2, 3, 4]
    ep = fake_source["put_bowl_demo__demo_10"]
    np.testing.assert_array_equal(data["states"], ep.states[[1, 2, 3, 4]])
    np.testing.assert_array_equal(data["actions"], ep.actions[[2, 3, 4, 5]])


def test_stage_is_deterministic_and_reuses_existing_files(tmp_path, fake_source):
    add(fake_source, make_episode("t", 0, steps(1, 4), after=False))
    _, first = run_stage(tmp_path, out="a")
    _, second = run_stage(tmp_path, out="b")
    name = "ep/t_demo__demo_0.npz"
    assert (first / name).read_bytes() == (second / name).read_bytes()
    (second / "episodes.json").unlink()
    mtime = (second / name).stat().st_mtime_ns
    run_stage(tmp_path, out="b")  # resume: the episode file is kept as it is
    assert (second / name).stat().st_mtime_ns == mtime and (second / "episodes.json").exists()


def test_max_drop_fraction_fails_with_numbers_and_option(tmp_path, fake_source):
    add(fake_source, make_episode("t", 0, steps(6, 4), after=False))
    cfg = base()
    with pytest.raises(StageError, match=r"drop 6 of 10 steps .*filter\.max_drop_fraction=0\.5"):
        run_stage(tmp_path, cfg)
    ok = replace(cfg, filter=replace(cfg.filter, max_drop_fraction=0.6))
    assert run_stage(tmp_path, ok, out="ok")[0].counts["out"] == 4


def test_empty_episode_is_a_data_error_naming_file_and_episode(tmp_path, fake_source):
    add(fake_source, make_episode("t", 3, steps(3, 0), after=False))
    with pytest.raises(DataError, match=r"empty.*file=t_demo\.hdf5, episode=demo_3"):
        run_stage(tmp_path)


def test_disabled_filter_keeps_every_step_but_still_pairs(tmp_path, fake_source):
    add(fake_source, make_episode("t", 0, steps(2, 3), after=True))
    cfg = replace(base(), filter=replace(base().filter, enabled=False))
    result, out = run_stage(tmp_path, cfg)
    assert result.counts["dropped"] == {"noop": 0, "no_prior_observation": 1}
    assert load_npz(out / "ep/t_demo__demo_0.npz")["obs_index"].tolist() == [0, 1, 2, 3]


def test_nan_action_is_a_data_error(tmp_path, fake_source):
    a = steps(0, 3)
    a[1, 2] = np.nan
    add(fake_source, make_episode("t", 0, a, after=False))
    with pytest.raises(DataError, match=r"NaN.*row 1.*episode=demo_0, key=actions"):
        run_stage(tmp_path)


def test_estimate_counts_episodes_and_steps(tmp_path, fake_source):
    add(fake_source, make_episode("t", 0, steps(1, 3), after=False),
        make_episode("t", 1, steps(0, 2), after=False))
    ctx = filt.STAGE.context(base(), raw=tmp_path, inputs={}, out=tmp_path / "x", quiet=True)
    assert filt.estimate(ctx) == {"episodes": 2, "steps": 6}


def test_filter_then_fit_bins_through_the_runner(tmp_path, fake_source):
    add(fake_source, make_episode("a", 0, steps(1, 5), after=True),
        make_episode("b", 0, steps(0, 4), after=False))
    raw = tmp_path / "raw"
    raw.mkdir()
    cfg = replace(base(), bins=replace(base().bins, fit_on="all"))
    runner = Runner(cfg, [filt.STAGE, fit_bins.STAGE], raw=raw, cache=tmp_path / "cache",
                    quiet=True)
    done = runner.run()
    manifest = read_json(done["filter"] / MANIFEST)
    assert manifest["counts"]["out"] == 9 and manifest["counts"]["dropped"]["noop"] == 1
    stats = Stats.load(done["fit-bins"] / "stats.json")
    assert stats.state.count == 9 and stats.provenance["episodes"] == 2
    assert runner.run() == done  # cache hit


# ---------------------------------------------------------------------------------------------
# Integration: the embedded demo suite (both LIBERO flavours) through the LIBERO reader
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flavour", ["raw", "regenerated"])
def test_demo_suite_pairs_each_action_with_the_state_before_it(tmp_path, flavour):
    write_demo_suite(tmp_path / "raw", flavour=flavour, size=32, tasks=2, demos=2, steps=30)
    runner = Runner(base(), [filt.STAGE, fit_bins.STAGE], raw=tmp_path / "raw",
                    cache=tmp_path / "cache", quiet=True)
    done = runner.run()
    rows = read_json(done["filter"] / "episodes.json")["episodes"]
    assert len(rows) == 4 and {r["flavour"] for r in rows} == {flavour}
    for row in rows:
        data = load_npz(done["filter"] / row["file"])
        ref = EpisodeRef(source=row["source"], key=row["key"], task=row["task"], length=0)
        states = load(tmp_path / "raw", ref, base().source).states
        # The end effector moves by a fixed multiple of the commanded xyz delta from the paired
        # observation to the next one: the pairing is right in both flavours.
        obs, act = data["obs_index"][:-1], data["actions"][:-1, :3]
        moving = np.abs(act) > 1e-3
        ratio = (states[obs + 1, :3] - states[obs, :3])[moving] / act[moving]
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-6)
        if flavour == "raw":
            assert row["dropped"]["noop"] > 0
            assert (data["obs_index"] == data["action_index"] - 1).all()
        else:
            assert row["dropped"] == {"noop": 0, "no_prior_observation": 0}
    assert Stats.load(done["fit-bins"] / "stats.json").state.dim == 8
