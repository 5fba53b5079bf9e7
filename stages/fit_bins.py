"""Stage `fit-bins`: fit the per-dimension state and action stats the bin codec uses (SPEC.md 3, 9).

Reads the `filter` output, keeps the training episodes (`pipeline.splits`; every episode when
`bins.fit_on=all`), and fits min/max/p01/p99/mean/std over their states and actions. When
`conv.relative_action_dims` is set, the ACTION stats are fitted over relative chunks
(`pipeline.actions.relative_chunk` for every t with t + conv.chunk <= T), since that is what gets
tokenized. With `bins.preset` set, min/max come from the named published preset and the other
stats still come from the data. Writes `stats.json` with provenance.

    rynn-pipe tokenize --raw demos --until fit-bins
    from shards.bins import Stats; stats = Stats.load(<fit-bins dir> / "stats.json")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.actions import relative_chunk, relative_dtype
from pipeline.config import RunConfig
from pipeline.errors import DataError, StageError
from pipeline.io import load_npz, read_json
from pipeline.runner import Context, Result, Stage
from pipeline.splits import TRAIN, episode_splits
from shards.bins import Accumulator, FieldStats, Stats, preset

STATS = "stats.json"


# ---------------------------------------------------------------------------------------------
# Pure helpers.
# ---------------------------------------------------------------------------------------------

def select_episodes(rows: list[dict[str, Any]], cfg: RunConfig,
                    fmt: str = "unknown") -> tuple[list[dict], dict]:
    """(episodes to fit on, {episode id: split})."""
    split = episode_splits(rows, cfg, fmt)
    chosen = rows if cfg.bins.fit_on == "all" else [r for r in rows if split[r["id"]] == TRAIN]
    if not chosen:
        raise StageError(f"no episodes to fit stats on ({len(rows)} episodes, none in the training "
                         "split); use --set bins.fit_on=all or lower split.val_task_fraction")
    return chosen, split


def action_rows(actions: np.ndarray, states: np.ndarray, k: int,
                dims: tuple[int, ...], dtype=np.float64) -> np.ndarray:
    """The action rows that get tokenized: the raw actions, or with relative dims every row of
    every relative chunk actions[t:t+k] (t + k <= T), shape (n_chunks * k, D)."""
    if not dims:
        return actions
    starts = range(len(actions) - k + 1)
    chunks = [relative_chunk(actions, states, t, k, dims, dtype) for t in starts]
    return np.concatenate(chunks) if chunks else actions[:0]


def check_finite(arr: np.ndarray, key: str, where: dict[str, str]) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=-1))[0])
        raise DataError(f"non-finite value (NaN or inf) at kept step {row}", key=key, **where)


def check_relative_dims(dims: tuple[int, ...], actions: np.ndarray, states: np.ndarray,
                        where: dict[str, str]) -> None:
    limit = min(actions.shape[1], states.shape[1])
    if dims and (max(dims) >= limit or min(dims) < 0):
        raise DataError(f"conv.relative_action_dims={list(dims)} needs dims below {limit} "
                        f"(actions have {actions.shape[1]}, states {states.shape[1]})", **where)


def apply_preset(name: str | None, state: FieldStats, action: FieldStats,
                 relative: tuple[int, ...]) -> tuple[FieldStats, FieldStats]:
    """Replace min/max with a named preset's (when set), checking dimensions."""
    if name is None:
        return state, action
    if relative:
        raise StageError(f"bins.preset={name!r} holds absolute action ranges; it cannot be used "
                         "with conv.relative_action_dims (set one of them to none/empty)")
    table = preset(name)
    for label, fs in (("state", state), ("action", action)):
        if len(table[label][0]) != fs.dim:
            raise StageError(f"bins.preset={name!r} has {len(table[label][0])} {label} dims but "
                             f"the data has {fs.dim}; fit from the data instead "
                             "(--set bins.preset=none)")
    return state.with_range(*table["state"]), action.with_range(*table["action"])


# ---------------------------------------------------------------------------------------------
# The stage.
# ---------------------------------------------------------------------------------------------

def accumulate(root: Path, rows: list[dict], cfg: RunConfig, ctx: Context
               ) -> tuple[Accumulator, Accumulator]:
    """Stream every chosen episode's states and (relative) action rows into accumulators."""
    dims, k = tuple(cfg.conv.relative_action_dims), cfg.conv.chunk
    states, actions = Accumulator(), Accumulator()
    with ctx.progress(len(rows), "fit-bins") as bar:
        for row in rows:
            where = {"file": str(root / row["file"]), "episode": row["id"]}
            data = load_npz(root / row["file"])
            for key in ("states", "actions"):
                check_finite(data[key], key, where)
            check_relative_dims(dims, data["actions"], data["states"], where)
            states.add(data["states"])
            actions.add(action_rows(data["actions"], data["states"], k, dims,
                                    relative_dtype(cfg)))
            bar.advance()
    return states, actions


def fit_stats(root: Path, cfg: RunConfig, ctx: Context) -> tuple[Stats, dict[str, Any]]:
    """The stats artifact and the Result counts for the filter output at `root`."""
    doc = read_json(root / "episodes.json")
    rows = doc["episodes"]
    chosen, split = select_episodes(rows, cfg, doc.get("format", "unknown"))
    state_acc, action_acc = accumulate(root, chosen, cfg, ctx)
    dims = tuple(cfg.conv.relative_action_dims)
    if not action_acc.count:
        raise StageError(f"no action chunk of conv.chunk={cfg.conv.chunk} steps fits in any of "
                         f"the {len(chosen)} episodes; lower conv.chunk")
    state, action = apply_preset(cfg.bins.preset, state_acc.finish(), action_acc.finish(), dims)
    n_val = sum(1 for s in split.values() if s != TRAIN)
    provenance = {"episodes": len(chosen), "steps": state_acc.count, "action_rows": action.count,
                  "fit_on": cfg.bins.fit_on, "split": {"train": len(split) - n_val, "val": n_val},
                  "chunk": cfg.conv.chunk if dims else None}
    stats = Stats(state=state, action=action, num_bins=cfg.bins.num_bins,
                  source=cfg.bins.preset or "fitted", relative_action_dims=dims,
                  provenance=provenance)
    counts = {"episodes": len(rows), "fitted_episodes": len(chosen), "steps": state_acc.count,
              "action_rows": action.count}
    return stats, counts


def run(ctx: Context) -> Result:
    stats, counts = fit_stats(ctx.inputs["filter"], ctx.cfg, ctx)
    stats.save(ctx.out / STATS)
    return Result(counts=counts)


STAGE = Stage(name="fit-bins", version="1",
              fields=("bins.*", "split.*", "conv.relative_action_dims", "conv.chunk", "compat"),
              deps=("filter",), run=run)
