"""`make bench` / `python -m bench [name ...]`: run the benchmarks, each printing its ratios.

Names: vq (pretokenize vs bare encoder vs published batch-1 re-encode), reader (shard reader vs
memmap vs pickle-per-sample, bytes per token), train (data wait vs compute, tokens/s),
infer (continuous vs discrete actions per second, KV cache vs none), rollout (policy calls per
second in a closed loop with the frame-code cache vs the naive per-call path, env steps/s), serve
(policy server round-trip latency and calls/s vs the in-process call), memory (peak RSS of
`tokenize` on 10 vs 100 demo episodes, of the reader over 1x vs 10x the shards).

`python -m bench --device cuda [--smoke]` runs the accelerator bench instead (bench/bench_device.py:
one JSON; `--device cpu --smoke` checks its code paths at toy sizes, as the test suite does).
"""

from __future__ import annotations

import importlib
import sys
import time

from pipeline.threads import passive_openmp

BENCHES = {"vq": "bench.bench_vq", "reader": "bench.bench_reader", "train": "bench.bench_train",
           "infer": "bench.bench_infer", "rollout": "bench.bench_rollout",
           "serve": "bench.bench_serve", "memory": "bench.bench_memory"}


def main(argv: list[str]) -> int:
    passive_openmp()        # as `rynn-pipe` does, before torch loads (pipeline/threads.py)
    if any(a == "--device" or a.startswith("--device=") for a in argv):
        from bench import bench_device
        bench_device.main(argv)
        return 0
    names = argv or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"unknown bench {unknown}; choose from {list(BENCHES)}", file=sys.stderr)
        return 2
    for name in names:
        print(f"\n=== bench {name} ===", flush=True)
        t0 = time.perf_counter()
        importlib.import_module(BENCHES[name]).main([])
        print(f"=== bench {name}: {time.perf_counter() - t0:.0f} s ===", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
