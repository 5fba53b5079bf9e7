"""Trainer benchmark: time per step split into waiting for data vs compute, tokens/s, the speed
of logits at supervised positions only vs full-vocabulary logits at every position, seconds per
step with fused AdamW and bf16 autocast vs torch's defaults, and tokens/s
of a training process alone vs beside a matmul-bound torch process (each in a fresh process):
before (torch's defaults: both take every core, waiting OpenMP threads spin) and after
(`OMP_WAIT_POLICY=PASSIVE` as `rynn-pipe` sets it, then also each process taking its share of the
thread budget, `pipeline.threads.threads_per_process(2)`).

    python -m bench train        # builds small demo shards (64 px) in a temp dir unless given
    python -m bench.bench_train --shards out/demo/shards --preset tiny --steps 12
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.threads import threads_per_process, usable_cores
from shards import vocab
from shards.reader import ShardReader
from trainer.checkpoint import processor_card
from trainer.config import resolve_train_config
from trainer.loss import Loss, paper_ce
from trainer.model import RynnModel
from trainer.train import build_optimizer, train_step


def demo_shards(root: Path, resolution: int) -> Path:
    from sim.demo_data import write_demo_suite
    from pipeline.workflow import resolve_config, tokenize
    write_demo_suite(root / "raw", tasks=1, demos=2, steps=24, seed=1)
    tokenize(resolve_config("demo", [f"image.resolution={resolution}"]), root / "raw", root / "out",
             quiet=True)
    return root / "out" / "shards"


def step_split(shards: Path, preset: str, steps: int, batch: int,
               overrides: tuple[str, ...] = ()) -> dict[str, float]:
    cfg = resolve_train_config(preset, [f"batch_size={batch}", "warmup_steps=1", *overrides],
                               steps=steps)
    card = processor_card(shards)
    torch.manual_seed(0)
    model = RynnModel(cfg.model, chunk=card["K"], action_dim=card["D"]).train()
    opt = build_optimizer(model, cfg)
    with ShardReader(shards, batch_size=batch, split="all", seed=0) as reader:
        batches = reader.forever()
        loss = Loss(cfg.loss)
        train_step(cfg, model, loss, opt, batches, 0, torch.device("cpu"))  # warm-up, not counted
        rows = [train_step(cfg, model, loss, opt, batches, s, torch.device("cpu"))
                for s in range(1, steps)]
    wait = sum(r["data_wait_s"] for r in rows)
    compute = sum(r["compute_s"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    return {"wait": wait, "compute": compute, "tokens_per_s": tokens / (wait + compute)}


def logits_ratio(shards: Path, preset: str, batch: int, reps: int = 3) -> tuple[float, float]:
    cfg = resolve_train_config(preset)
    card = processor_card(shards)
    model = RynnModel(cfg.model, chunk=card["K"], action_dim=card["D"]).train()
    with ShardReader(shards, batch_size=batch, split="all", seed=0) as reader:
        b = next(iter(reader))

    def full() -> None:
        h = model.hidden(b["input_ids"], b["attention_mask"].bool())
        logits = model.lm_head(h[:, :-1]).float()
        F.cross_entropy(logits.reshape(-1, vocab.VOCAB_SIZE), b["labels"][:, 1:].reshape(-1),
                        ignore_index=vocab.IGNORE_INDEX).backward()

    def supervised() -> None:
        h = model.hidden(b["input_ids"], b["attention_mask"].bool())
        logits, targets, token_is_vla = model.supervised_logits(h, b["labels"], b["is_vla"])
        sum(paper_ce(logits, targets, token_is_vla).values()).backward()

    return _time(full, reps), _time(supervised, reps)


STEP_VARIANTS = {"fp32, AdamW per-tensor loop (torch's default)": (),
                 "fp32, fused AdamW": ("adamw=fused",),
                 "bf16 autocast, fused AdamW": ("adamw=fused", "precision=bf16")}


def step_variants(shards: Path, args) -> None:
    """Seconds per training step under the optimizer / precision settings the sim experiment
    uses (`--set adamw=fused --set precision=bf16`) against torch's defaults, in this process."""
    secs = {}
    for name, overrides in STEP_VARIANTS.items():
        s = step_split(shards, args.preset, args.steps, args.batch, overrides)
        secs[name] = (s["wait"] + s["compute"]) / (args.steps - 1)
    base = secs[next(iter(STEP_VARIANTS))]
    print(f"training step ({args.preset}, batch {args.batch}, {torch.get_num_threads()} threads):")
    for name, sec in secs.items():
        print(f"  {name}: {sec:.3f} s -> {base / sec:.2f}x")


def _time(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


BURN = ("import sys, torch\ntorch.set_num_threads(int(sys.argv[1]))\na = torch.randn(384, 384)\n"
        "while True:\n    a = torch.tanh(a @ a)\n")


def tokens_per_s(shards: Path, args, threads: int, neighbour_threads: int | None,
                 policy: str) -> float:
    """Training tokens/s of a fresh process with `threads` intra-op threads and
    OMP_WAIT_POLICY=`policy`, beside a torch process busy with matmuls on `neighbour_threads`
    threads under the same policy (None: no such process)."""
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    other = None if neighbour_threads is None else subprocess.Popen(
        [sys.executable, "-c", BURN, str(neighbour_threads)], env=env)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench.bench_train", "--shards", str(shards), "--preset",
             args.preset, "--batch", str(args.batch), "--contention-steps",
             str(args.contention_steps), "--child-threads", str(threads)],
            env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"bench train child failed:\n{done.stderr[-3000:]}")
        return float(done.stdout.split()[-1])
    finally:
        if other is not None:
            other.kill()
            other.wait()


def contention(shards: Path, args) -> None:
    """Before: torch's defaults (every process takes every core, waiting threads spin). After:
    sleeping waits (`rynn-pipe` sets them), then also the thread budget."""
    cores, share = usable_cores(), threads_per_process(2)
    solo_spin = tokens_per_s(shards, args, cores, None, "ACTIVE")
    before = tokens_per_s(shards, args, cores, cores, "ACTIVE")
    solo = tokens_per_s(shards, args, cores, None, "PASSIVE")
    after = tokens_per_s(shards, args, share, share, "PASSIVE")
    print(f"training tokens/s beside a second torch process ({args.preset}, batch {args.batch}, "
          f"{cores} usable cores, load average {os.getloadavg()[0]:.1f}):\n"
          f"  before, spinning waits: alone {solo_spin:.0f}, beside ({cores}+{cores} threads) "
          f"{before:.0f} -> {solo_spin / before:.2f}x slower\n"
          f"  after, sleeping waits and the thread budget: alone {solo:.0f}, beside "
          f"({share}+{share} threads) {after:.0f} -> {solo / after:.2f}x slower (goal: within 2x)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=Path)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=64,
                    help="of the demo shards built when --shards is not given (the demo: 128)")
    ap.add_argument("--contention-steps", type=int, default=3,
                    help="steps per run of the second-process comparison (the first is warm-up)")
    ap.add_argument("--skip-split", action="store_true",
                    help="only the second-process comparison (needs --shards or builds them)")
    ap.add_argument("--child-threads", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_threads:                      # one run of `contention`, in its own process
        torch.set_num_threads(args.child_threads)
        split = step_split(args.shards, args.preset, args.contention_steps, args.batch)
        print(split["tokens_per_s"])
        return
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or demo_shards(Path(tmp), args.resolution)
        if args.skip_split:
            contention(shards, args)
            return
        s = step_split(shards, args.preset, args.steps, args.batch)
        total = s["wait"] + s["compute"]
        print(f"trainer ({args.preset}, batch {args.batch}, {args.steps - 1} steps): data wait "
              f"{s['wait']:.3f} s vs compute {s['compute']:.2f} s -> wait "
              f"{100 * s['wait'] / total:.2f}% of step time (goal < 2%); "
              f"{s['tokens_per_s']:.0f} tokens/s")
        full, sup = logits_ratio(shards, args.preset, args.batch)
        print(f"forward+backward: full-vocabulary logits {full:.2f} s vs supervised positions only "
              f"{sup:.2f} s -> {full / sup:.2f}x faster")
        step_variants(shards, args)
        contention(shards, args)


if __name__ == "__main__":
    main()
