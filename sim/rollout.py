"""Closed-loop rollouts: a policy (or a baseline) in an environment for N seeded episodes per task.

    rynn-pipe rollout --env demo --policy runs/demo/latest --episodes 10 --seed 1000 \\
        --mode continuous --procs 2 --out runs/demo/rollout --videos 2
    rynn-pipe rollout --env demo --policy expert --episodes 10 --out runs/demo/expert
    rynn-pipe rollout --env demo --policy mean --shards out/demo/shards --out runs/demo/mean

    from sim.rollout import RolloutConfig, rollout
    summary = rollout(RolloutConfig(env="demo", policy="expert", episodes=5, out=Path("r")))

Policies: a checkpoint (a run directory, its `latest`, or a step directory) or a baseline:
`expert` (the env's scripted solver), `replay` (the recorded actions of the demo the episode's
layout comes from, where the env provides them), `mean` (the dataset's mean action chunk from
`--shards`: a shard directory's stats, or a checkpoint's processor card; relative-action dims get
the current state added, as the policy does).

Episodes: the env plays task `seed % num_tasks` for a seed (`num_tasks` is 1 for single-task envs),
so N episodes per task are the seeds S .. S + N * num_tasks - 1. Each policy call returns a chunk
of K actions; all K are executed (action chunking; `execute` = n runs only the first n,
re-planning more often) unless the episode ends first, and an episode never runs past
`env.max_steps`. The model's history frames are the observation before the last executed step
(the previous frame, as in the shards). The policy encodes each camera frame once: its processor
keeps the VQ codes of recent frames, so a history frame that was the current frame of the
previous call is not encoded again (with execute = 1 that halves VQ work; with whole chunks the
previous frame is new at every call). `code_cache=False` is the naive path. Several env
processes run at once (`procs`, spawned, each with one torch thread; procs=1 runs here with one
thread too); the results do not depend on `procs`: same seeds, same checkpoint, same results
(`actions_sha256` digests every executed action).

Output in `out` (each file atomically; the videos as their episodes end, the rest when the run
ends): `episodes.jsonl` (one line per episode:
seed, task, success, steps, wall and policy time, policy calls, latency), `summary.json` (success
rate and 95 % Wilson interval per task and overall; the checkpoint directory a run path resolved
to), `videos/seed-<seed>.mp4` (front | wrist,
upright) for the first `videos` episodes and `contact_sheet.png` (one row per video episode).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing as mp
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageDraw
from rich.table import Table

from pipeline.config import ConfigError
from pipeline.io import write_bytes, write_json
from pipeline.media import write_video
from pipeline.progress import Progress, console
from trainer.card import (MalformedActions, PolicyError, parse_card, read_card,
                          resolve_checkpoint)
from trainer.checkpoint import processor_card
from trainer.policy import Policy
from shards.shard_set import ShardSet
from sim.env import Env, EnvError, Observation, make_env

BASELINES = ("expert", "replay", "mean")
MODES = ("continuous", "discrete")
Z95 = 1.959963984540054          # the 97.5 % quantile of the standard normal
FPS = 20                         # video frame rate (the demo task's and LIBERO's control rate)
SHEET_COLUMNS = 8                # frames per contact-sheet row


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """One rollout run; validated at construction."""

    env: str
    policy: str                               # checkpoint path or expert | replay | mean
    out: Path
    episodes: int = 10                        # per task
    seed: int = 0
    mode: str = "continuous"
    procs: int = 1
    videos: int = 0                           # the first N episodes get videos
    shards: Path | None = None                # the `mean` baseline's statistics
    vq_path: str | None = None
    tokenizer_path: str | None = None
    constrained: bool = True                  # discrete mode under the response grammar
    execute: int | None = None                # actions executed per policy call (None: all K)
    code_cache: bool = True                   # reuse the VQ codes of frames seen before
    env_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = [(self.episodes >= 1, "episodes", "use at least 1"),
                  (self.seed >= 0, "seed", "use a seed >= 0"),
                  (self.mode in MODES, "mode", f"choose one of {list(MODES)}"),
                  (self.procs >= 1, "procs", "use at least 1"),
                  (self.videos >= 0, "videos", "use 0 or more"),
                  (self.execute is None or self.execute >= 1, "execute", "use at least 1"),
                  (self.policy != "mean" or self.shards is not None, "shards",
                   "the mean baseline needs --shards (a shard directory or a checkpoint)")]
        for ok, option, hint in checks:
            if not ok:
                value = getattr(self, option)
                raise ConfigError(f"rollout --{option}: got {value!r}; {hint}")


# ---------------------------------------------------------------------------------------------
# Agents: what chooses the next actions.
# ---------------------------------------------------------------------------------------------

class Agent(Protocol):
    def start(self, env: Env) -> None:
        """A new episode begins (after env.reset)."""

    def chunk(self, env: Env, obs: Observation, prev: Observation | None) -> np.ndarray:
        """The next actions (n, D) to execute; n = 0 ends the episode."""


class ExpertAgent:
    """The env's scripted solver, one action per call (it is closed loop)."""

    def start(self, env: Env) -> None:
        pass

    def chunk(self, env: Env, obs: Observation, prev: Observation | None) -> np.ndarray:
        return env.expert_action()[None]


class ReplayAgent:
    """The recorded actions of the demo the episode's layout comes from."""

    def start(self, env: Env) -> None:
        recorded = getattr(env, "recorded_actions", None)
        if recorded is None:
            raise EnvError(f"env {env.name!r} has no recorded actions to replay")
        self.actions, self.t = recorded(), 0

    def chunk(self, env: Env, obs: Observation, prev: Observation | None) -> np.ndarray:
        self.t += 1
        return self.actions[self.t - 1:self.t]


class MeanAgent:
    """The dataset's mean action chunk (K, D), every call."""

    def __init__(self, card) -> None:
        self.mean = np.tile(card.stats.action.mean, (card.chunk, 1))
        self.relative = list(card.relative_dims)

    def start(self, env: Env) -> None:
        pass

    def chunk(self, env: Env, obs: Observation, prev: Observation | None) -> np.ndarray:
        out = self.mean.copy()
        out[:, self.relative] += obs.state[self.relative]
        return out


class PolicyAgent:
    """A checkpoint: K actions per call from the current (and previous) observation.

    A malformed generation (possible only with constrained=False) ends the episode as a failure
    and is kept in `malformed`; it never stops the rollout."""

    def __init__(self, policy, mode: str, constrained: bool) -> None:
        self.policy, self.mode, self.constrained = policy, mode, constrained
        self.history = policy.card.history >= 2
        self.malformed: list[str] = []

    def start(self, env: Env) -> None:
        self.malformed = []

    def chunk(self, env: Env, obs: Observation, prev: Observation | None) -> np.ndarray:
        prev = prev if self.history else None
        try:
            return self.policy.act(obs.instruction, obs.state, obs.front, obs.wrist,
                                   prev_front=None if prev is None else prev.front,
                                   prev_wrist=None if prev is None else prev.wrist,
                                   mode=self.mode, constrained=self.constrained)
        except MalformedActions as exc:
            self.malformed = exc.problems
            return np.zeros((0, env.action_dim))


def baseline_card(path: Path):
    """The card the `mean` baseline reads: a checkpoint's, or one made from a shard directory."""
    path = Path(path)
    if ShardSet.is_shard_set(path):
        shards = ShardSet.open(path)
        return parse_card(processor_card(shards), where=shards.manifest_file)
    try:
        return read_card(resolve_checkpoint(path))
    except PolicyError as exc:
        raise ConfigError(f"rollout --shards {path}: neither a shard directory (no manifest.json)"
                          f" nor a checkpoint ({exc})") from None


def build_agent(cfg: RolloutConfig) -> Agent:
    if cfg.policy == "expert":
        return ExpertAgent()
    if cfg.policy == "replay":
        return ReplayAgent()
    if cfg.policy == "mean":
        return MeanAgent(baseline_card(cfg.shards))
    policy = Policy.from_checkpoint(cfg.policy, vq_path=cfg.vq_path,
                                    tokenizer_path=cfg.tokenizer_path)
    if not cfg.code_cache:
        policy.processor.cache_frames = 0
    return PolicyAgent(policy, cfg.mode, cfg.constrained)


# ---------------------------------------------------------------------------------------------
# One episode.
# ---------------------------------------------------------------------------------------------

@dataclass
class Episode:
    """What one episode produced: its JSON record and, when recorded, its frames."""

    record: dict[str, Any]
    frames: list[np.ndarray] = field(default_factory=list)   # upright front | wrist per step


def upright_pair(obs: Observation) -> np.ndarray:
    """Front | wrist side by side, upright (observations are bottom-row-first)."""
    return np.concatenate([obs.front[::-1, ::-1], obs.wrist[::-1, ::-1]], axis=1)


def run_episode(env: Env, agent: Agent, seed: int, *, record: bool = False,
                execute: int | None = None) -> Episode:
    """Reset with `seed`, then execute chunks (their first `execute` actions; None: all) until
    success or the env's step limit."""
    t0 = time.perf_counter()
    obs, prev = env.reset(seed), None
    agent.start(env)
    frames = [upright_pair(obs)] if record else []
    digest, steps, success, policy_s, calls = hashlib.sha256(), 0, False, 0.0, 0
    done = False
    while not done and steps < env.max_steps:
        t = time.perf_counter()
        actions = np.asarray(agent.chunk(env, obs, prev), dtype=np.float64)
        policy_s, calls = policy_s + time.perf_counter() - t, calls + 1
        if len(actions) == 0:
            break
        for action in actions[:min(execute or len(actions), env.max_steps - steps)]:
            digest.update(action.tobytes())
            step = env.step(action)
            steps, prev, obs = steps + 1, obs, step.obs
            success, done = step.success, step.done
            if record:
                frames.append(upright_pair(obs))
            if done:
                break
    record_ = {"seed": seed, "task": obs.instruction, "success": bool(success), "steps": steps,
               "wall_s": round(time.perf_counter() - t0, 4), "policy_s": round(policy_s, 4),
               "policy_calls": calls, "latency_ms": round(1000 * policy_s / max(calls, 1), 2),
               "actions_sha256": digest.hexdigest()}
    if getattr(agent, "malformed", None):
        record_["malformed"] = list(agent.malformed)
    return Episode(record_, frames)


# ---------------------------------------------------------------------------------------------
# Workers: one env + one agent per process.
# ---------------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _worker_init(cfg: RolloutConfig) -> None:
    """A worker's env and agent, with one torch thread (one env per process)."""
    if cfg.policy not in BASELINES:
        torch.set_num_threads(1)
    _WORKER.update(cfg=cfg, env=make_env(cfg.env, **cfg.env_kwargs), agent=build_agent(cfg))


def _worker_run(seed: int, record: bool) -> Episode:
    cfg = _WORKER["cfg"]
    episode = run_episode(_WORKER["env"], _WORKER["agent"], seed, record=record,
                          execute=cfg.execute)
    if record:
        write_video(cfg.out / "videos" / f"seed-{seed:06d}.mp4", episode.frames, FPS)
        episode.frames = sheet_frames(episode.frames)
    return episode


def _run_here(cfg: RolloutConfig, seeds: list[int], recorded: set[int], bar) -> list[Episode]:
    """procs=1: the episodes in this process, with the workers' one torch thread (so the results
    match any `procs`); the caller's thread count is restored afterwards."""
    uses_torch, out = cfg.policy not in BASELINES, []
    if uses_torch:
        threads = torch.get_num_threads()
    try:
        _worker_init(cfg)
        for seed in seeds:
            out.append(_worker_run(seed, seed in recorded))
            bar.advance()
    finally:
        if uses_torch:
            torch.set_num_threads(threads)
        if "env" in _WORKER:
            _WORKER.pop("env").close()
    return out


def _run_all(cfg: RolloutConfig, seeds: list[int], recorded: set[int]) -> list[Episode]:
    out: list[Episode] = []
    with Progress(len(seeds), f"rollout {cfg.policy} in {cfg.env}") as bar:
        if cfg.procs == 1:
            return _run_here(cfg, seeds, recorded, bar)
        with ProcessPoolExecutor(min(cfg.procs, len(seeds)), mp_context=mp.get_context("spawn"),
                                 initializer=_worker_init, initargs=(cfg,)) as pool:
            futures = [pool.submit(_worker_run, s, s in recorded) for s in seeds]
            for fut in as_completed(futures):
                out.append(fut.result())
                bar.advance()
    return sorted(out, key=lambda e: e.record["seed"])


# ---------------------------------------------------------------------------------------------
# Statistics and the summary.
# ---------------------------------------------------------------------------------------------

def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % by default)."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_row(records: list[dict[str, Any]]) -> dict[str, Any]:
    n, k = len(records), sum(r["success"] for r in records)
    lo, hi = wilson(k, n)
    return {"episodes": n, "successes": k, "success_rate": k / n if n else 0.0,
            "wilson95": [round(lo, 4), round(hi, 4)],
            "mean_steps": round(float(np.mean([r["steps"] for r in records])), 2)}


def summarize(cfg: RolloutConfig, records: list[dict[str, Any]]) -> dict[str, Any]:
    by_task: dict[str, list] = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    calls = sum(r["policy_calls"] for r in records)
    checkpoint = None if cfg.policy in BASELINES else str(resolve_checkpoint(cfg.policy))
    return {"env": cfg.env, "policy": cfg.policy, "checkpoint": checkpoint, "mode": cfg.mode,
            "constrained": cfg.constrained,
            "episodes_per_task": cfg.episodes, "seeds": [records[0]["seed"], records[-1]["seed"]],
            "tasks": {task: rate_row(rows) for task, rows in sorted(by_task.items())},
            "overall": rate_row(records),
            "policy_latency_ms": round(1000 * sum(r["policy_s"] for r in records) / max(calls, 1),
                                       2)}


def print_table(summary: dict[str, Any]) -> None:
    table = Table(title=f"{summary['policy']} in {summary['env']} ({summary['mode']})")
    for col in ("task", "episodes", "success", "95% Wilson", "mean steps"):
        table.add_column(col)
    rows = [*summary["tasks"].items(), ("overall", summary["overall"])]
    for name, row in rows:
        lo, hi = row["wilson95"]
        table.add_row(name, str(row["episodes"]), f"{row['successes']} ({row['success_rate']:.0%})",
                      f"{lo:.0%} - {hi:.0%}", f"{row['mean_steps']:.1f}")
    console.print(table)


# ---------------------------------------------------------------------------------------------
# Videos and the contact sheet.
# ---------------------------------------------------------------------------------------------

def sheet_frames(frames: list[np.ndarray]) -> list[np.ndarray]:
    """SHEET_COLUMNS frames evenly spaced over the episode, the first and last included."""
    picks = np.linspace(0, len(frames) - 1, min(SHEET_COLUMNS, len(frames))).round().astype(int)
    return [frames[i] for i in picks]


def contact_sheet(episodes: list[Episode]) -> bytes:
    """PNG bytes: one row per episode (a green or red bar for success), sampled frames."""
    h, w = episodes[0].frames[0].shape[:2]
    bar, label = 8, 14
    sheet = Image.new("RGB", (bar + SHEET_COLUMNS * w, len(episodes) * (h + label)), (20, 20, 20))
    draw = ImageDraw.Draw(sheet)
    for row, ep in enumerate(episodes):
        y = row * (h + label)
        colour = (40, 170, 60) if ep.record["success"] else (205, 40, 40)
        draw.rectangle([0, y, bar - 1, y + h + label - 1], fill=colour)
        draw.text((bar + 2, y + 1), f"seed {ep.record['seed']}  {ep.record['task']}  "
                  f"{'success' if ep.record['success'] else 'failure'} in {ep.record['steps']} "
                  "steps", fill=(235, 235, 235))
        for col, frame in enumerate(ep.frames):
            sheet.paste(Image.fromarray(frame), (bar + col * w, y + label))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------

def check_runnable(cfg: RolloutConfig) -> int:
    """Fail here, in one line, before any worker starts: the policy (checkpoint path, or what the
    baseline needs) and the env spec. Returns the env's number of tasks."""
    if cfg.policy == "mean":
        baseline_card(cfg.shards)
    elif cfg.policy not in BASELINES:
        read_card(resolve_checkpoint(cfg.policy))
    probe = make_env(cfg.env, **cfg.env_kwargs)
    try:
        if cfg.policy == "replay" and not hasattr(probe, "recorded_actions"):
            raise EnvError(f"env {probe.name!r} has no recorded actions: --policy replay needs "
                           "an env that provides them (demo)")
        if cfg.policy == "expert":
            probe.reset(cfg.seed)
            probe.expert_action()                     # EnvError where there is no solver
        return int(getattr(probe, "num_tasks", 1))
    finally:
        probe.close()


def episode_seeds(cfg: RolloutConfig, num_tasks: int) -> list[int]:
    return list(range(cfg.seed, cfg.seed + cfg.episodes * num_tasks))


def rollout(cfg: RolloutConfig, *, quiet: bool = False) -> dict[str, Any]:
    """Run every episode, write episodes.jsonl, summary.json, videos and the contact sheet."""
    num_tasks = check_runnable(cfg)
    seeds = episode_seeds(cfg, num_tasks)
    recorded = set(seeds[:cfg.videos])
    if recorded:
        (cfg.out / "videos").mkdir(parents=True, exist_ok=True)
    episodes = _run_all(cfg, seeds, recorded)
    records = [e.record for e in episodes]
    summary = summarize(cfg, records)
    summary["config"] = {k: v for k, v in asdict(cfg).items() if k != "out"}
    write_bytes(cfg.out / "episodes.jsonl",
                "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())
    if recorded:
        sheet = [e for e in episodes if e.record["seed"] in recorded]
        write_bytes(cfg.out / "contact_sheet.png", contact_sheet(sheet))
    write_json(cfg.out / "summary.json", summary)
    if not quiet:
        print_table(summary)
    return summary
