"""Deterministic train/val split by task and by trajectory within a task (SPEC.md 6).

Rule (pure; the same inputs always give the same split, on any machine):
1. Tasks are sorted by name. The LAST `n_held = round_half_up(n_tasks * val_task_fraction)` tasks
   are held out whole as val ("last tasks out-of-distribution"); when the fraction is > 0 and
   there are at least 2 tasks, n_held is at least 1 and at most n_tasks - 1 (a train task stays).
2. In every other task, `round_half_up(n_episodes * val_episode_fraction)` trajectories are val
   (at least 1 when the fraction is > 0 and the task has >= 2 episodes, never all of them):
   those with the smallest sha256(seed, task, episode id). Seeded, independent of input order
   and of Python's hash randomization; adding an episode moves at most one other.

    from pipeline.splits import assign_splits
    split = assign_splits([("pick_bowl", "ep_0"), ...], 0.1, 0.1, seed=0)   # {"ep_0": "train"}
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict

TRAIN, VAL = "train", "val"


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def held_out_count(n: int, fraction: float) -> int:
    """How many of n items go to val: rounded, >= 1 when fraction > 0 and n >= 2, <= n - 1."""
    if fraction <= 0 or n < 2:
        return 0
    return min(max(1, round_half_up(n * fraction)), n - 1)


def _rank(seed: int, task: str, episode_id: str) -> str:
    return hashlib.sha256(f"{seed}\0{task}\0{episode_id}".encode()).hexdigest()


def val_episodes(task: str, ids: list[str], fraction: float, seed: int) -> set[str]:
    """The val trajectories of one (not held-out) task."""
    ranked = sorted(ids, key=lambda e: (_rank(seed, task, e), e))
    return set(ranked[: held_out_count(len(ids), fraction)])


def assign_splits(episodes: list[tuple[str, str]], val_task_fraction: float,
                  val_episode_fraction: float, seed: int) -> dict[str, str]:
    """{episode_id: "train" | "val"} for (task, episode_id) pairs."""
    by_task: dict[str, list[str]] = defaultdict(list)
    for task, episode_id in episodes:
        by_task[task].append(episode_id)
    tasks = sorted(by_task)
    n_held = held_out_count(len(tasks), val_task_fraction)
    held = set(tasks[len(tasks) - n_held:])
    out: dict[str, str] = {}
    for task in tasks:
        ids = by_task[task]
        val = set(ids) if task in held else val_episodes(task, ids, val_episode_fraction, seed)
        out.update({e: VAL if e in val else TRAIN for e in ids})
    return out


# ---------------------------------------------------------------------------------------------
# The published rule (compat=published, SPEC.md 6).
# ---------------------------------------------------------------------------------------------

VAL_IND, VAL_OOD = "val_ind", "val_ood"


def trajectory_folder(episode_key: str) -> str:
    """`trj_<demo number>`, the published per-trajectory folder name (`demo_10` -> `trj_10`)."""
    digits = "".join(ch for ch in episode_key.rsplit("_", 1)[-1] if ch.isdigit())
    return f"trj_{digits or episode_key}"


def published_splits(episodes: list[tuple[str, str, str]]) -> dict[str, str]:
    """{episode_id: "train" | "val_ind" | "val_ood"} for (task, episode_id, episode_key) triples.

    Tasks sorted by name, the first ceil(0.9 n) in-distribution, the rest val_ood; inside a task
    the `trj_<n>` folder names sorted as STRINGS (trj_10 before trj_2), the first ceil(0.9 n)
    train, the rest val_ind. The joint training set is all three.
    """
    by_task: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for task, episode_id, key in episodes:
        by_task[task].append((trajectory_folder(key), episode_id))
    tasks = sorted(by_task)
    n_ind = math.ceil(0.9 * len(tasks))
    out: dict[str, str] = {}
    for i, task in enumerate(tasks):
        trajs = sorted(by_task[task])
        n_train = math.ceil(0.9 * len(trajs))
        for j, (_, episode_id) in enumerate(trajs):
            out[episode_id] = VAL_OOD if i >= n_ind else TRAIN if j < n_train else VAL_IND
    return out


def coarse(split: str) -> str:
    """The sample split label of a published split: train stays train, val_ind/val_ood are val."""
    return TRAIN if split == TRAIN else VAL


def episode_splits(rows: list[dict], cfg, fmt: str) -> dict[str, str]:
    """{episode id: split} of the filter's `episodes.json` rows under the run config: the
    project's rule by default; with compat=published the published rule for LIBERO (train,
    val_ind, val_ood) and no split at all for LeRobot (every episode train, SPEC.md 1.2)."""
    if cfg.compat != "published":
        return assign_splits([(r["task"], r["id"]) for r in rows], cfg.split.val_task_fraction,
                             cfg.split.val_episode_fraction, cfg.split.seed)
    if fmt == "lerobot":
        return {r["id"]: TRAIN for r in rows}
    return published_splits([(r["task"], r["id"], r["key"]) for r in rows])
