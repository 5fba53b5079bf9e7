"""Deterministic splits and the `fit-bins` stage on a hand-built filter output."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.actions import relative_chunk
from pipeline.config import RunConfig, base
from pipeline.errors import DataError, StageError
from pipeline.io import write_json, write_npz
from pipeline.splits import assign_splits, held_out_count
from stages import fit_bins
from shards.bins import Stats
from shards.presets import LIBERO_STATE_MAX, LIBERO_VLA_ACTION_MIN

# ---------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------


def episodes(n_tasks: int, per_task: int) -> list[tuple[str, str]]:
    return [(f"task_{t}", f"task_{t}__demo_{e}") for t in range(n_tasks) for e in range(per_task)]


def test_last_tasks_held_out_and_deterministic():
    eps = episodes(10, 10)
    split = assign_splits(eps, 0.1, 0.1, seed=0)
    assert all(split[e] == "val" for t, e in eps if t == "task_9")
    for t in range(9):
        assert sum(split[f"task_{t}__demo_{e}"] == "val" for e in range(10)) == 1
    assert assign_splits(list(reversed(eps)), 0.1, 0.1, seed=0) == split
    other = assign_splits(eps, 0.1, 0.1, seed=1)
    assert other != split and sum(v == "val" for v in other.values()) == 19


def test_split_edge_cases():
    assert held_out_count(3, 0.1) == 1 and held_out_count(1, 0.5) == 0
    assert held_out_count(10, 0.25) == 3 and held_out_count(2, 0.9) == 1
    assert held_out_count(5, 0.0) == 0
    single = assign_splits(episodes(1, 1), 0.5, 0.5, seed=0)
    assert single == {"task_0__demo_0": "train"}
    none = assign_splits(episodes(3, 4), 0.0, 0.0, seed=0)
    assert set(none.values()) == {"train"}


# ---------------------------------------------------------------------------------------------
# fit-bins on a hand-built filter output
# ---------------------------------------------------------------------------------------------

def write_filter_output(root: Path, eps: dict[str, tuple[str, np.ndarray, np.ndarray]]) -> None:
    rows = []
    for ep_id, (task, actions, states) in eps.items():
        rows.append({"id": ep_id, "task": task, "file": f"ep/{ep_id}.npz",
                     "n_kept": len(actions)})
        n = len(actions)
        write_npz(root / f"ep/{ep_id}.npz", obs_index=np.arange(n), action_index=np.arange(n),
                  actions=actions, states=states)
    write_json(root / "episodes.json", {"schema": 1, "format": "libero", "episodes": rows})


def arrays(offset: float, n: int = 4, d_act: int = 7, d_state: int = 8):
    a = offset + np.arange(n * d_act, dtype=np.float64).reshape(n, d_act) / 10
    s = offset + np.arange(n * d_state, dtype=np.float64).reshape(n, d_state) / 100
    return a, s


def cfg_with(**groups) -> RunConfig:
    cfg = base()
    changes = {k: replace(getattr(cfg, k), **v) for k, v in groups.items()}
    return replace(cfg, **changes)


def run_fit(tmp_path: Path, cfg: RunConfig) -> Stats:
    ctx = fit_bins.STAGE.context(cfg, raw=None, inputs={"filter": tmp_path / "filter"},
                  out=tmp_path / "out", quiet=True)
    fit_bins.run(ctx)
    return Stats.load(ctx.out / "stats.json")


@pytest.fixture()
def two_tasks(tmp_path):
    eps = {"a__demo_0": ("a", *arrays(0.0)), "a__demo_1": ("a", *arrays(1.0)),
           "b__demo_0": ("b", *arrays(50.0))}
    write_filter_output(tmp_path / "filter", eps)
    return eps


def test_fits_on_training_split_only(tmp_path, two_tasks):
    cfg = cfg_with(split={"val_task_fraction": 0.5, "val_episode_fraction": 0.0})
    stats = run_fit(tmp_path, cfg)
    a0, s0 = two_tasks["a__demo_0"][1:]
    a1, s1 = two_tasks["a__demo_1"][1:]
    np.testing.assert_allclose(stats.action.min, a0.min(axis=0))
    np.testing.assert_allclose(stats.action.max, a1.max(axis=0))
    np.testing.assert_allclose(stats.state.mean, np.vstack([s0, s1]).mean(axis=0))
    assert stats.state.count == 8 and stats.source == "fitted"
    assert stats.provenance["episodes"] == 2 and stats.provenance["fit_on"] == "train"
    assert stats.provenance["split"] == {"train": 2, "val": 1}


def test_fit_on_all(tmp_path, two_tasks):
    cfg = cfg_with(split={"val_task_fraction": 0.5}, bins={"fit_on": "all"})
    stats = run_fit(tmp_path, cfg)
    np.testing.assert_allclose(stats.action.max, two_tasks["b__demo_0"][1].max(axis=0))
    assert stats.provenance["episodes"] == 3 and stats.state.count == 12


def test_relative_action_chunks(tmp_path, two_tasks):
    cfg = cfg_with(bins={"fit_on": "all"}, conv={"relative_action_dims": (0, 2), "chunk": 3})
    stats = run_fit(tmp_path, cfg)
    rows = [relative_chunk(a, s, t, 3, (0, 2)) for _, a, s in two_tasks.values() for t in (0, 1)]
    expect = np.concatenate(rows)
    assert stats.action.count == 3 * 2 * 3  # 3 episodes x 2 chunks x 3 rows
    np.testing.assert_allclose(stats.action.min, expect.min(axis=0))
    np.testing.assert_allclose(stats.action.max, expect.max(axis=0))
    # by hand: dim 0 of episode a__demo_0, chunk t=0, row 0 is a[0, 0] - s[0, 0] = 0 - 0
    assert expect[0, 0] == 0.0 and expect[1, 0] == pytest.approx(0.7 - 0.0)
    assert stats.relative_action_dims == (0, 2) and stats.provenance["chunk"] == 3


def test_chunk_longer_than_every_episode_fails(tmp_path, two_tasks):
    cfg = cfg_with(bins={"fit_on": "all"}, conv={"relative_action_dims": (0,), "chunk": 9})
    with pytest.raises(StageError, match="conv.chunk=9"):
        run_fit(tmp_path, cfg)


def test_preset_min_max_with_data_stats(tmp_path, two_tasks):
    cfg = cfg_with(bins={"preset": "libero_published", "fit_on": "all"})
    stats = run_fit(tmp_path, cfg)
    assert stats.source == "libero_published"
    assert stats.state.max.tolist() == list(LIBERO_STATE_MAX)
    assert stats.action.min.tolist() == list(LIBERO_VLA_ACTION_MIN)
    all_states = np.vstack([s for _, _, s in two_tasks.values()])
    np.testing.assert_allclose(stats.state.mean, all_states.mean(axis=0))


def test_nan_names_the_episode(tmp_path):
    a, s = arrays(0.0)
    s[2, 1] = np.inf
    write_filter_output(tmp_path / "filter", {"x__demo_4": ("x", a, s)})
    with pytest.raises(DataError, match=r"step 2.*episode=x__demo_4, key=states"):
        run_fit(tmp_path, cfg_with(bins={"fit_on": "all"}))
