"""The published 256-bin codec (SPEC.md 3) as pure vectorized functions, and the stats artifact.

Codec, per dimension, with the fitted (or preset) min/max:
    n = clip(2 (x - min) / (max - min + 1e-8) - 1, -1, 1)        normalize
    d = digitize(n, linspace(-1, 1, num_bins))  in 1..num_bins    to_bins (num_bins only at n == 1)
    k = clip(d - 1, 0, num_bins - 2); n' = centre of [edge k, edge k+1]   from_bins
    x' = (n' + 1) / 2 (max - min + 1e-8) + min                   unnormalize (exact inverse)
A zero-range dimension (min == max) normalizes to -1 (no NaN) and decodes back near min.

`stats.json` (docs/ARCHITECTURE.md) is read and written by `Stats.load` / `Stats.save`;
`Accumulator` fits per-dimension stats over a stream of (n, D) arrays.

    from shards.bins import Stats, encode, decode
    stats = Stats.load(path)
    tokens = encode(actions, stats.action, stats.num_bins)        # int64, 1..num_bins
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from pipeline.errors import DataError, StageError
from pipeline.io import read_json, write_json
from shards.presets import PRESETS

SCHEMA = 1
NUM_BINS = 256
EPS = 1e-8
FIELDS = ("state", "action")
STAT_KEYS = ("min", "max", "p01", "p99", "mean", "std")


# ---------------------------------------------------------------------------------------------
# The codec (pure, vectorized over any leading shape; the last axis is the dimension).
# ---------------------------------------------------------------------------------------------

def normalize(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Map [lo, hi] to [-1, 1] per dimension, clipped."""
    x, lo, hi = (np.asarray(v, dtype=np.float64) for v in (x, lo, hi))
    return np.clip(2.0 * (x - lo) / (hi - lo + EPS) - 1.0, -1.0, 1.0)


def unnormalize(n: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Inverse of `normalize` on [-1, 1] (same min/max, same epsilon)."""
    n, lo, hi = (np.asarray(v, dtype=np.float64) for v in (n, lo, hi))
    return (n + 1.0) / 2.0 * (hi - lo + EPS) + lo


def edges(num_bins: int = NUM_BINS) -> np.ndarray:
    """The num_bins evenly spaced bin edges from -1 to 1 (num_bins - 1 intervals)."""
    return np.linspace(-1.0, 1.0, num_bins)


def centres(num_bins: int = NUM_BINS) -> np.ndarray:
    """Centre of each of the num_bins - 1 intervals between consecutive edges."""
    e = edges(num_bins)
    return (e[:-1] + e[1:]) / 2.0


def to_bins(n: np.ndarray, num_bins: int = NUM_BINS) -> np.ndarray:
    """Bin ids 1..num_bins of normalized values (np.digitize; num_bins only when n == 1.0)."""
    n = np.clip(np.asarray(n, dtype=np.float64), -1.0, 1.0)
    return np.digitize(n, edges(num_bins)).astype(np.int64)


def from_bins(d: np.ndarray, num_bins: int = NUM_BINS) -> np.ndarray:
    """Normalized value of bin ids: the centre of interval clip(d - 1, 0, num_bins - 2)."""
    k = np.clip(np.asarray(d, dtype=np.int64) - 1, 0, num_bins - 2)
    return centres(num_bins)[k]


def encode(x: np.ndarray, stats: "FieldStats", num_bins: int = NUM_BINS) -> np.ndarray:
    """Raw values (..., D) -> bin ids (..., D) with the field's min/max."""
    return to_bins(normalize(x, stats.min, stats.max), num_bins)


def decode(d: np.ndarray, stats: "FieldStats", num_bins: int = NUM_BINS) -> np.ndarray:
    """Bin ids (..., D) -> raw values (..., D) (bin centres, un-normalized)."""
    return unnormalize(from_bins(d, num_bins), stats.min, stats.max)


# ---------------------------------------------------------------------------------------------
# The stats artifact.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FieldStats:
    """Per-dimension stats of one field (state or action); arrays of shape (D,)."""

    min: np.ndarray
    max: np.ndarray
    p01: np.ndarray
    p99: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    count: int

    @property
    def dim(self) -> int:
        return int(len(self.min))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: [float(v) for v in getattr(self, k)] for k in STAT_KEYS}
        out["count"] = int(self.count)
        return out

    @classmethod
    def from_dict(cls, obj: dict[str, Any], where: str) -> "FieldStats":
        missing = [k for k in (*STAT_KEYS, "count") if k not in obj]
        if missing:
            raise DataError(f"stats field is missing {missing}", file=where)
        arrays = {k: np.asarray(obj[k], dtype=np.float64) for k in STAT_KEYS}
        if len({a.shape for a in arrays.values()}) != 1 or arrays["min"].ndim != 1:
            raise DataError("stats arrays must be 1-D and of one length", file=where)
        return cls(**arrays, count=int(obj["count"]))

    def with_range(self, lo: Iterable[float], hi: Iterable[float]) -> "FieldStats":
        """The same stats with min/max replaced (a preset)."""
        return replace(self, min=np.asarray(lo, dtype=np.float64),
                       max=np.asarray(hi, dtype=np.float64))


@dataclass(frozen=True)
class Stats:
    """The `stats.json` artifact: state and action stats plus how they were made."""

    state: FieldStats
    action: FieldStats
    num_bins: int = NUM_BINS
    source: str = "fitted"
    relative_action_dims: tuple[int, ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "source": self.source, "num_bins": self.num_bins,
                "state": self.state.to_dict(), "action": self.action.to_dict(),
                "relative_action_dims": list(self.relative_action_dims),
                "provenance": dict(self.provenance)}

    @classmethod
    def from_dict(cls, obj: dict[str, Any], where: str = "stats.json") -> "Stats":
        if obj.get("schema") != SCHEMA:
            raise DataError(f"stats schema {obj.get('schema')!r} is not {SCHEMA}; rerun fit-bins",
                            file=where, key="schema")
        for key in FIELDS:
            if key not in obj:
                raise DataError("stats has no such field", file=where, key=key)
        return cls(state=FieldStats.from_dict(obj["state"], where),
                   action=FieldStats.from_dict(obj["action"], where),
                   num_bins=int(obj.get("num_bins", NUM_BINS)),
                   source=str(obj.get("source", "fitted")),
                   relative_action_dims=tuple(int(d) for d in obj.get("relative_action_dims", ())),
                   provenance=dict(obj.get("provenance", {})))

    @classmethod
    def load(cls, path: str | Path) -> "Stats":
        path = Path(path)
        if not path.is_file():
            raise DataError("stats file does not exist; run the fit-bins stage", file=str(path))
        return cls.from_dict(read_json(path), where=str(path))

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())


# ---------------------------------------------------------------------------------------------
# Fitting.
# ---------------------------------------------------------------------------------------------

class Accumulator:
    """Per-dimension stats over a stream of (n, D) arrays.

    min, max, mean and std (population) stream in float64 (Chan et al. merge of count/mean/M2).
    Percentiles (p01, p99) are exact over the values kept as float32 columns: memory is the
    (rows, D) float32 size of the state/action data, 32 bytes per 8-d row (about 9 MB for all
    four LIBERO suites; K times more for relative action chunks), never images. They are
    informational: the codec uses min/max only.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None
        self.lo: np.ndarray | None = None
        self.hi: np.ndarray | None = None
        self._parts: list[np.ndarray] = []

    def add(self, arr: np.ndarray) -> None:
        arr = np.asarray(arr, dtype=np.float64)
        if arr.ndim != 2 or not len(arr):
            return
        if self.mean is None:
            self._start(arr.shape[1])
        if arr.shape[1] != len(self.mean):
            raise DataError(f"rows of {arr.shape[1]} dims after rows of {len(self.mean)} dims")
        n, mean = len(arr), arr.mean(axis=0)
        delta, total = mean - self.mean, self.count + n
        self.m2 = self.m2 + ((arr - mean) ** 2).sum(axis=0) + delta ** 2 * self.count * n / total
        self.mean = self.mean + delta * n / total
        self.count = total
        self.lo = np.minimum(self.lo, arr.min(axis=0))
        self.hi = np.maximum(self.hi, arr.max(axis=0))
        self._parts.append(arr.astype(np.float32))

    def _start(self, dim: int) -> None:
        self.mean, self.m2 = np.zeros(dim), np.zeros(dim)
        self.lo, self.hi = np.full(dim, np.inf), np.full(dim, -np.inf)

    def finish(self) -> FieldStats:
        if not self.count:
            raise StageError("no data to fit stats on (zero rows)")
        values = np.concatenate(self._parts)
        p01, p99 = np.percentile(values, [1, 99], axis=0).astype(np.float64)
        return FieldStats(min=self.lo, max=self.hi, p01=p01, p99=p99, mean=self.mean,
                          std=np.sqrt(self.m2 / self.count), count=self.count)


def fit(arrays: Iterable[np.ndarray]) -> FieldStats:
    """Per-dimension stats of the rows of a stream of (n, D) arrays."""
    acc = Accumulator()
    for arr in arrays:
        acc.add(arr)
    return acc.finish()


def preset(name: str) -> dict[str, tuple[tuple[float, ...], tuple[float, ...]]]:
    """{"state": (min, max), "action": (min, max)} of a named published preset."""
    if name not in PRESETS:
        raise StageError(f"bins.preset: unknown preset {name!r}; choose one of "
                         f"{', '.join(sorted(PRESETS))} or none (fit from the data)")
    return PRESETS[name]
