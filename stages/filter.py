"""Stage `filter`: drop no-op steps and pair every kept action with the observation taken before it.

SPEC.md 2: a step is a no-op when the norm of its motion part is below `filter.noop_threshold` AND
its gripper equals the gripper of the last KEPT action; while nothing is kept yet (the first step)
only the norm test applies. SPEC.md 1.1: raw-release LIBERO files record obs[t] AFTER actions[t],
so action t pairs with obs row t-1 and action 0 (no prior observation) is dropped; regenerated and
LeRobot data pair action t with obs row t.

Image sizes: without a fitting rule the project makes square images of square frames only, so a
non-square frame (e.g. 128 x 96) is refused with one error naming file, episode and key, never
silently stretched, unless the recipe says how to fit it: `source.non_square=stretch` (the `so100`
recipe: the published VLA processor's square resize) or compat=published (the published fitting,
shards.fit). A LIBERO frame under MIN_SIDE px is refused. With compat=published LeRobot data gets no no-op filter
(SPEC.md 1.2).

Output (docs/ARCHITECTURE.md): `episodes.json` and one deterministic `ep/<episode_id>.npz` per
episode, written atomically, so a rerun after a crash reuses the episode files already written.

    rynn-pipe tokenize --raw demos --until filter              # via the runner
    from stages.filter import noop_keep_mask, pair_steps      # the pure per-episode rules
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import FilterConfig, RunConfig
from pipeline.episode import Episode, EpisodeRef
from pipeline.errors import DataError, StageError
from pipeline.io import npz_bytes, write_bytes, write_json
from pipeline.runner import Context, Result, Stage
from stages import source

SCHEMA = 1
MIN_SIDE = 16  # one VQ code: a smaller frame is degenerate
NOOP = "noop"
NO_PRIOR = "no_prior_observation"
REASONS = (NOOP, NO_PRIOR)


# ---------------------------------------------------------------------------------------------
# Pure per-episode rules.
# ---------------------------------------------------------------------------------------------

def noop_keep_mask(actions: np.ndarray, threshold: float = 1e-4) -> np.ndarray:
    """Bool (T,): True for steps that are NOT no-ops (SPEC.md 2).

    Motion = every dim but the last (the gripper), i.e. `a[:6]` for 7-d LIBERO actions.
    Computed without a Python loop from one observation: once any step is kept, the gripper of
    the last kept action always equals the gripper of the previous step (a dropped step has, by
    definition, the last kept gripper). Before the first kept step, only the norm test applies.
    """
    actions = np.asarray(actions, dtype=np.float64)
    small = np.linalg.norm(actions[:, :-1], axis=1) < threshold
    grip = actions[:, -1]
    changed = np.concatenate([[True], grip[1:] != grip[:-1]])
    keep = ~small | changed
    first = np.flatnonzero(~small)
    keep[: first[0] if first.size else len(keep)] = False
    return keep


def pair_steps(keep: np.ndarray, obs_after_action: bool
               ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """(obs_index, action_index, dropped by reason) for a keep mask.

    obs_after_action=False: kept action t pairs with obs row t. True (raw-release LIBERO): with
    obs row t-1; a kept action 0 has no prior observation and is dropped as `no_prior_observation`.
    """
    keep = np.asarray(keep, dtype=bool)
    action_index = np.flatnonzero(keep).astype(np.int64)
    no_prior = 0
    if obs_after_action and action_index.size and action_index[0] == 0:
        action_index, no_prior = action_index[1:], 1
    obs_index = action_index - 1 if obs_after_action else action_index.copy()
    return obs_index, action_index, {NOOP: int((~keep).sum()), NO_PRIOR: no_prior}


def keep_mask(actions: np.ndarray, cfg: FilterConfig) -> np.ndarray:
    """The no-op rule, or keep everything when `filter.enabled` is false."""
    if not cfg.enabled:
        return np.ones(len(actions), dtype=bool)
    return noop_keep_mask(actions, cfg.noop_threshold)


def filter_episode(ep: Episode, cfg: FilterConfig) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The arrays of `ep/<id>.npz` and the dropped counts for one episode (pure)."""
    where = {"file": ep.ref.source, "episode": ep.ref.key}
    actions = _checked(ep.actions, "actions", where)
    states = _checked(ep.states, "states", where)
    obs_index, action_index, dropped = pair_steps(keep_mask(actions, cfg), ep.obs_after_action)
    if action_index.size == 0:
        raise DataError(f"the filter would leave this episode empty ({len(actions)} raw steps: "
                        f"{dropped[NOOP]} no-ops, {dropped[NO_PRIOR]} without prior observation)",
                        **where)
    if obs_index.max() >= len(states):
        raise DataError(f"observation row {obs_index.max()} is needed but states has only "
                        f"{len(states)} rows", key="states", **where)
    arrays = {"obs_index": obs_index, "action_index": action_index,
              "actions": actions[action_index], "states": states[obs_index]}
    return arrays, dropped


def _checked(arr: np.ndarray, key: str, where: dict[str, str]) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise DataError(f"expected a (T, D) array, got shape {arr.shape}", key=key, **where)
    if not np.isfinite(arr).all():
        row = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise DataError(f"non-finite value (NaN or inf) at row {row}", key=key, **where)
    return arr


def episode_row(ep: Episode, n_kept: int, dropped: dict[str, int]) -> dict[str, Any]:
    """One entry of episodes.json."""
    ref = ep.ref
    return {"id": ref.episode_id, "source": ref.source, "key": ref.key, "task": ref.task,
            "instruction": ep.instruction,
            "instruction_source": ep.meta.get("instruction_source", "task"),
            "flavour": ep.meta.get("flavour", ep.meta.get("format", "unknown")),
            "n_raw": int(len(ep.actions)), "n_kept": int(n_kept),
            "image_hw": [int(v) for v in ep.image_size],
            "file": episode_file(ref), "dropped": dict(dropped)}


def episode_file(ref: EpisodeRef) -> str:
    return f"ep/{ref.episode_id}.npz"


def order_key(ref: EpisodeRef) -> tuple[str, int, str]:
    """(source, demo number, key): demo_10 sorts after demo_9."""
    digits = re.search(r"(\d+)$", ref.key)
    return ref.source, int(digits.group(1)) if digits else -1, ref.key


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Result counts: episodes, steps in/out, dropped by reason and by task."""
    by_reason = {r: 0 for r in REASONS}
    by_task: dict[str, dict[str, int]] = {}
    for row in rows:
        task = by_task.setdefault(row["task"], {r: 0 for r in REASONS})
        for reason, n in row["dropped"].items():
            by_reason[reason] += n
            task[reason] += n
    return {"episodes": len(rows), "in": sum(r["n_raw"] for r in rows),
            "out": sum(r["n_kept"] for r in rows), "dropped": by_reason,
            "dropped_by_task": dict(sorted(by_task.items()))}


def check_drop_fraction(counts: dict[str, Any], cfg: FilterConfig) -> None:
    """StageError when more than `filter.max_drop_fraction` of all steps would be dropped."""
    total, dropped = counts["in"], counts["in"] - counts["out"]
    if total and dropped / total > cfg.max_drop_fraction:
        reasons = ", ".join(f"{k}={v}" for k, v in counts["dropped"].items())
        raise StageError(
            f"filter would drop {dropped} of {total} steps ({dropped / total:.1%}; {reasons}), "
            f"more than filter.max_drop_fraction={cfg.max_drop_fraction}. Check the data and "
            f"filter.noop_threshold={cfg.noop_threshold}, or allow it with "
            f"--set filter.max_drop_fraction={min(1.0, round(dropped / total + 0.05, 2))}")


# ---------------------------------------------------------------------------------------------
# The stage.
# ---------------------------------------------------------------------------------------------

def check_image_size(ep: Episode, cfg: RunConfig, fmt: str) -> None:
    """Refuse degenerate LIBERO frames, and non-square ones unless the recipe fits them
    (source.non_square=stretch, or compat=published)."""
    h, w = ep.image_size
    camera = cfg.source.front_camera if fmt == "libero" else cfg.source.lerobot_front_key
    where = {"file": ep.ref.source, "episode": ep.ref.key,
             "key": f"obs/{camera}" if fmt == "libero" else camera}
    if fmt == "libero" and min(h, w) < MIN_SIDE:
        raise DataError(f"{h} x {w} images are degenerate (a side under {MIN_SIDE} px)", **where)
    if h != w and cfg.compat != "published" and cfg.source.non_square == "refuse":
        raise DataError(f"{h} x {w} images are not square and the recipe has no fitting rule: "
                        "crop them square first, stretch them to square as the published VLA "
                        "processor does (--set source.non_square=stretch), or use the published "
                        "fitting (--set compat=published)", **where)


def process(root: Path, ref: EpisodeRef, ctx: Context, fmt: str = "unknown") -> dict[str, Any]:
    """Filter one episode, write its npz unless a previous (crashed) run already did."""
    ep = source.load(root, ref, ctx.cfg.source)
    check_image_size(ep, ctx.cfg, fmt)
    unfiltered = ctx.cfg.compat == "published" and fmt == "lerobot"
    arrays, dropped = filter_episode(ep, replace(ctx.cfg.filter, enabled=False)
                                     if unfiltered else ctx.cfg.filter)
    path = ctx.out / episode_file(ref)
    if not path.exists():  # written atomically and deterministically: an existing file is final
        write_bytes(path, npz_bytes(**arrays))
    return episode_row(ep, len(arrays["action_index"]), dropped)


def run(ctx: Context) -> Result:
    refs = sorted(source.scan(ctx.raw, ctx.cfg.source), key=order_key)
    if not refs:
        raise DataError(f"no episodes found under {ctx.raw}", file=str(ctx.raw))
    rows = []
    fmt = source.format_name(ctx.raw, ctx.cfg.source)
    with ctx.progress(len(refs), "filter") as bar:
        for ref in refs:
            rows.append(process(ctx.raw, ref, ctx, fmt))
            bar.advance()
    counts = summarize(rows)
    check_drop_fraction(counts, ctx.cfg.filter)
    write_json(ctx.out / "episodes.json", {"schema": SCHEMA, "format": fmt, "episodes": rows})
    return Result(counts=counts)


def estimate(ctx: Context) -> dict[str, int]:
    refs = source.scan(ctx.raw, ctx.cfg.source)
    return {"episodes": len(refs), "steps": sum(r.length for r in refs)}


STAGE = Stage(name="filter", version="1", fields=("source.*", "filter.*", "compat"), deps=("raw",),
              run=run, estimate=estimate)
