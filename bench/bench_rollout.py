"""Bench `rollout`: policy calls/s in a closed loop vs the naive per-call path; env steps/s.

One process, the demo env (`sim.demo_env`, 128 px) and a policy built like the demo recipe's:
the trainer's RynnModel (random init, `--preset tiny`), the small random VQ-GAN at 128 px, history
M=2, chunk K=5, the fallback tokenizer. Each path runs the same seeded episode through
`sim.rollout.run_episode`, re-planning every step (execute=1, where the history frames are the
previous call's current frames):
- rollout: the processor's code cache on (each camera frame VQ-encoded once);
- naive: the cache off (every call encodes all four frames, as a per-call `Policy.act` does).
Both must produce the same actions (the bench checks the digests). It also times whole-chunk
execution (K actions per call: the previous frame is new at every call, so the cache cannot
help there) and env steps per second of the demo env under its scripted expert, and prints the
env step time against one policy call.

    python -m bench rollout                 # or: python -m bench.bench_rollout --calls 6
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from sim.env import make_env
from sim.rollout import ExpertAgent, PolicyAgent, run_episode
from shards.bins import NUM_BINS, FieldStats, Stats
from trainer.config import PRESETS
from trainer.model import RynnModel
from trainer.card import Card
from trainer.engine import Backend
from trainer.policy import Policy, Processor

RES, K, D, STATE_DIM, SEED = 128, 5, 7, 8, 1000


def field_stats(dim: int) -> FieldStats:
    ones = np.ones(dim)
    return FieldStats(min=-ones, max=ones, p01=-ones, p99=ones, mean=0 * ones, std=ones, count=1)


def demo_policy(preset: str) -> Policy:
    """A demo-recipe-shaped policy without shards: a hand-made card, random weights."""
    from shards.tokenizer import fallback_tokenizer
    from shards.vq import load_vq
    stats = Stats(state=field_stats(STATE_DIM), action=field_stats(D), num_bins=NUM_BINS)
    card = Card(resolution=RES, orientation="rot180", chunk=K, action_dim=D, state_dim=STATE_DIM,
                history=2, stats=stats, tokenizer={}, vq={}, recipe="demo")
    vq = load_vq(None, random_arch="small", seed=0, device=torch.device("cpu"))
    torch.manual_seed(0)
    model = RynnModel(PRESETS[preset], chunk=K, action_dim=D).eval()
    return Policy(Processor(card, fallback_tokenizer(warn=False), vq),
                  Backend(model, torch.device("cpu")))


def policy_run(policy: Policy, calls: int, *, cache: bool, execute: int | None
               ) -> tuple[float, str, int]:
    """(policy calls per second, actions digest, frames encoded) of one episode."""
    policy.processor.cache_frames = 8 if cache else 0
    policy.processor.clear_codes()
    steps = calls * (execute or K)
    env = make_env("demo", size=RES, max_steps=steps)
    episode = run_episode(env, PolicyAgent(policy, "continuous", True), SEED, execute=execute)
    rec = episode.record
    return rec["policy_calls"] / rec["policy_s"], rec["actions_sha256"], policy.processor.encoded


def interleaved(policy: Policy, args, execute: int | None) -> dict[bool, tuple[float, str, int]]:
    """Per path (cache on / off): median calls/s over `repeats` runs taken in turn (the machine's
    load drifts), the actions digest and frames encoded of the last run."""
    rates: dict[bool, list[float]] = {True: [], False: []}
    last: dict[bool, tuple[float, str, int]] = {}
    for _ in range(args.repeats):
        for cache in (True, False):
            last[cache] = policy_run(policy, args.calls, cache=cache, execute=execute)
            rates[cache].append(last[cache][0])
    return {c: (float(np.median(rates[c])), *last[c][1:]) for c in rates}


def env_steps_per_s(episodes: int) -> tuple[float, float]:
    """(env steps per second, seconds per step) of the demo env driven by its expert."""
    env, agent, steps, t0 = make_env("demo", size=RES), ExpertAgent(), 0, time.perf_counter()
    for seed in range(SEED, SEED + episodes):
        steps += run_episode(env, agent, seed).record["steps"]
    elapsed = time.perf_counter() - t0
    return steps / elapsed, elapsed / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--calls", type=int, default=3, help="policy calls per timed episode")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per path (median)")
    parser.add_argument("--env-episodes", type=int, default=10)
    args = parser.parse_args(argv)
    policy = demo_policy(args.preset)
    policy_run(policy, 1, cache=True, execute=1)                     # warm-up
    runs = interleaved(policy, args, execute=1)
    if len({digest for _, digest, _ in runs.values()}) != 1:
        raise SystemExit("bench rollout: the cached path's actions differ from the naive path's")
    (fast, _, enc_fast), (slow, _, enc_slow) = runs[True], runs[False]
    chunks = interleaved(policy, args, execute=None)
    chunk_fast, chunk_slow = chunks[True][0], chunks[False][0]
    env_rate, env_step_s = env_steps_per_s(args.env_episodes)
    print(f"preset {args.preset}, {RES} px, K={K}, M=2, {args.calls} policy calls per episode, "
          f"median of {args.repeats} interleaved episodes per path")
    print(f"re-plan every step: rollout {fast:.3f} calls/s ({enc_fast} frames encoded) vs naive "
          f"{slow:.3f} calls/s ({enc_slow} frames encoded): {fast / slow:.2f}x, same actions")
    print(f"whole chunks (K={K} steps per call): rollout {chunk_fast:.3f} calls/s vs naive "
          f"{chunk_slow:.3f} calls/s: {chunk_fast / chunk_slow:.2f}x (the previous frame is new)")
    print(f"demo env: {env_rate:.1f} steps/s; one policy call (rollout) costs "
          f"{1 / fast / env_step_s:.0f} env steps")


if __name__ == "__main__":
    main()
