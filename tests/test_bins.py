"""The 256-bin codec on hand-computed values, the stats artifact and the streaming fit."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import DataError, StageError
from shards.bins import (Accumulator, FieldStats, Stats, decode, edges, encode, fit, from_bins,
                         normalize, preset, to_bins, unnormalize)


def field_stats(lo, hi) -> FieldStats:
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    return FieldStats(min=lo, max=hi, p01=lo, p99=hi, mean=(lo + hi) / 2, std=hi - lo, count=3)


def test_edges_are_256_points_from_minus_one_to_one():
    e = edges()
    assert e.shape == (256,) and e[0] == -1.0 and e[-1] == 1.0
    assert e[1] == pytest.approx(-1 + 2 / 255)


def test_normalize_hand_values():
    lo, hi = np.array([0.0, -2.0]), np.array([1.0, 2.0])
    n = normalize(np.array([[0.0, -2.0], [1.0, 2.0], [0.5, 0.0], [3.0, -9.0]]), lo, hi)
    assert n[0].tolist() == [-1.0, -1.0]
    assert n[1] == pytest.approx([1.0, 1.0], abs=1e-7)  # 2 / (1 + 1e-8) - 1
    assert n[2] == pytest.approx([0.0, 0.0], abs=1e-7)
    assert n[3].tolist() == [1.0, -1.0]  # clipped


def test_to_bins_hand_values():
    assert to_bins(np.array([-1.0, 0.0, 1.0])).tolist() == [1, 128, 256]
    # 0 lies between edge 127 (-1/255) and edge 128 (+1/255): digitize gives 128.
    assert to_bins(np.array([0.999999, -1.5, 1.5])).tolist() == [255, 1, 256]


def test_values_exactly_on_edges():
    e = edges()
    assert to_bins(e[[0, 1, 127, 128, 254, 255]]).tolist() == [1, 2, 128, 129, 255, 256]
    assert to_bins(np.nextafter(e[1], -2.0)).tolist() == 1
    assert (to_bins(e) == np.arange(1, 257)).all()


def test_from_bins_hand_values():
    d = from_bins(np.array([1, 256, 128, 0, 300]))
    assert d[0] == pytest.approx(-254 / 255)  # centre of interval 0
    assert d[1] == pytest.approx(254 / 255)   # centre of interval 254
    assert d[2] == pytest.approx(0.0, abs=1e-12)
    assert d[3] == pytest.approx(-254 / 255) and d[4] == pytest.approx(254 / 255)  # clipped


def test_round_trip_error_at_most_half_a_bin():
    rng = np.random.default_rng(0)
    lo, hi = np.array([-0.5, 0.0, 10.0]), np.array([0.5, 3.0, 10.5])
    x = rng.uniform(lo, hi, size=(500, 3))
    x = np.vstack([x, lo, hi])
    s = field_stats(lo, hi)
    err = np.abs(decode(encode(x, s), s) - x)
    assert (err <= (hi - lo) / 255 / 2 + 1e-9).all()


def test_unnormalize_inverts_normalize():
    lo, hi = np.array([-3.0]), np.array([5.0])
    x = np.linspace(-3, 5, 17)[:, None]
    np.testing.assert_allclose(unnormalize(normalize(x, lo, hi), lo, hi), x, atol=1e-12)


def test_zero_range_dimension_has_no_nan():
    s = field_stats([0.3, 0.0], [0.3, 1.0])
    x = np.array([[0.3, 0.5], [0.9, 0.5], [-1.0, 0.5]])
    d = encode(x, s)
    assert d[:, 0].tolist() == [1, 256, 1]
    back = decode(d, s)
    assert np.isfinite(back).all() and back[0, 0] == pytest.approx(0.3)


def test_stats_save_load_round_trip(tmp_path):
    stats = Stats(state=field_stats([0, 1], [2, 3]), action=field_stats([-1], [1]),
                  source="fitted", relative_action_dims=(0,), provenance={"episodes": 2})
    stats.save(tmp_path / "stats.json")
    back = Stats.load(tmp_path / "stats.json")
    assert back.to_dict() == stats.to_dict()
    assert back.to_dict()["state"]["min"] == [0.0, 1.0] and back.action.count == 3


def test_stats_load_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Stats.load(tmp_path / "missing.json")
    with pytest.raises(DataError, match="schema"):
        Stats.from_dict({"schema": 7})
    with pytest.raises(DataError, match="missing"):
        Stats.from_dict({"schema": 1, "state": {"min": [0]}, "action": {}})


def test_streaming_fit_matches_numpy():
    rng = np.random.default_rng(1)
    parts = [rng.normal(size=(n, 4)) * [1, 2, 3, 0] for n in (5, 1, 37, 0, 12)]
    allv = np.concatenate(parts)
    s = fit(parts)
    assert s.count == 55
    np.testing.assert_allclose(s.mean, allv.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(s.std, allv.std(axis=0), atol=1e-12)
    np.testing.assert_array_equal(s.min, allv.min(axis=0))
    np.testing.assert_array_equal(s.max, allv.max(axis=0))
    p = np.percentile(allv.astype(np.float32), [1, 99], axis=0)
    np.testing.assert_allclose([s.p01, s.p99], p, atol=1e-6)


def test_fit_errors():
    with pytest.raises(StageError, match="zero rows"):
        fit([])
    acc = Accumulator()
    acc.add(np.zeros((2, 3)))
    with pytest.raises(DataError, match="3 dims"):
        acc.add(np.zeros((2, 4)))


def test_presets():
    table = preset("libero_published")
    assert len(table["state"][0]) == 8 and len(table["action"][1]) == 7
    with pytest.raises(StageError, match="unknown preset 'nope'.*libero_published"):
        preset("nope")
