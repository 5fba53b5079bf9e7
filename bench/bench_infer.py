"""Bench `infer`: actions per second of the continuous head vs discrete decoding, K = 5 and 10.

One process, the trainer's own RynnModel (random init, `--preset tiny` by default: Chameleon backbone, output
projection, action head), the same VLA prompt layout as the shards at 256 px with history 2
(text + state block + 4 image blocks, about 1.17k tokens). Per chunk size K it times:
- continuous: prompt + ACTION_START, one forward, the head (SPEC.md 8);
- discrete with a KV cache: the prompt once, then one token per step (K blocks of D + 2 tokens
  and the closing SEP: K (D + 2) + 1 steps, forced to that length since a random network does
  not stop by itself);
- discrete without a cache: every step reruns the whole sequence (the baseline).
It prints chunk calls per second and actions per second (K actions per call), and the ratios.
Image encoding (the VQ-GAN, the same in both modes) is not included.

    python -m bench infer                   # or: python -m bench.bench_infer --repeats 3
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from shards import vocab
from trainer.config import PRESETS
from trainer.model import RynnModel
from trainer.engine import Backend, Stepper, attention_rule

D, STATE_DIM, RES, HISTORY = 7, 8, 256, 2


def prompt(rng: np.random.Generator, res: int = RES) -> np.ndarray:
    """A VLA query of the shards' layout at `res` px with random contents."""
    side = res // vocab.VQ_DOWNSAMPLE
    text = rng.integers(16005, 16260, 60)
    state = vocab.state_block(rng.integers(1, 257, STATE_DIM))
    images = []
    for _ in range(2 * HISTORY):
        codes = rng.integers(vocab.IMAGE_CODE_FIRST, vocab.IMAGE_CODE_LAST + 1, (side, side))
        rows = np.concatenate([codes, np.full((side, 1), vocab.IMAGE_ROW_END)], 1).reshape(-1)
        images.append(np.concatenate([[vocab.IMAGE_START, vocab.grid_token(res),
                                       vocab.grid_token(res)], rows, [vocab.IMAGE_END]]))
    return np.concatenate([[vocab.BOS], text, state, *images, [vocab.SEP]]).astype(np.int64)


def continuous(backend: Backend, ids: np.ndarray) -> None:
    seq = np.append(ids, vocab.ACTION_START)
    hidden = backend.run(seq.tolist(), 0, torch.from_numpy(attention_rule(seq)), None)
    backend.head(hidden[:, :-1])


def discrete(backend: Backend, ids: np.ndarray, k: int, use_cache: bool) -> None:
    stepper = Stepper(backend, ids, use_cache=use_cache)
    for _ in range(k * (D + 2) + 1):
        stepper.greedy()


def timed(fn, repeats: int) -> float:
    """Median seconds per call (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_k(k: int, args, ids: np.ndarray) -> dict[str, float]:
    torch.manual_seed(0)
    model = RynnModel(PRESETS[args.preset], chunk=k, action_dim=D).eval()
    backend = Backend(model, torch.device("cpu"))
    runs = {"continuous": lambda: continuous(backend, ids),
            "discrete+kv": lambda: discrete(backend, ids, k, True),
            "discrete-nocache": lambda: discrete(backend, ids, k, False)}
    reps = {"discrete-nocache": max(1, args.repeats // 3)}
    return {name: timed(fn, reps.get(name, args.repeats)) for name, fn in runs.items()}


def report(k: int, secs: dict[str, float]) -> None:
    for name, s in secs.items():
        print(f"K={k:2d} {name:17s} {1 / s:8.2f} chunks/s  {k / s:8.1f} actions/s (Hz)  "
              f"{s * 1e3:8.1f} ms/chunk", flush=True)
    print(f"K={k:2d} continuous / discrete+kv: {secs['discrete+kv'] / secs['continuous']:.1f}x; "
          f"KV cache speed-up: {secs['discrete-nocache'] / secs['discrete+kv']:.1f}x", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="trainer model preset")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    ids = prompt(np.random.default_rng(0))
    print(f"prompt {len(ids)} tokens (256 px, history {HISTORY}); random-init RynnModel "
          f"preset {args.preset!r}; torch threads {torch.get_num_threads()}")
    for k in (5, 10):
        report(k, bench_k(k, args, ids))


if __name__ == "__main__":
    main()
