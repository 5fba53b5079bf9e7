"""Bench `memory`: peak resident memory does not grow with the data.

- `tokenize` (every stage, in a fresh process) on the demo suite with 10 vs 100 episodes (24 steps,
  32 px frames, the demo recipe at 32 px so it takes about a minute): peak RSS ratio (goal <= 1.2);
- the training reader (`ShardReader`, in a fresh process) over one epoch of a shard set and of one
  10x larger (bench_reader's samples, about 1.2k tokens each): peak RSS ratio.

Each measurement runs in its own process and reports its own `ru_maxrss` (its input is written
beforehand by another process), so imports and the model count the same on both sides and
nothing is inherited from the other run; the figures include the interpreter, torch and the
model (about 0.25-0.5 GiB), which is the point: they must not grow with the data.

    python -m bench memory                  # or: python -m bench.bench_memory --episodes 10,100
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL = 1.2


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024    # Linux: KiB


def write_demo(root: Path, episodes: int) -> None:
    from sim.demo_data import write_demo_suite
    write_demo_suite(root / "raw", tasks=1, demos=episodes, steps=24, size=32, seed=3)


def run_tokenize(root: Path, episodes: int) -> None:
    from pipeline.workflow import resolve_config, tokenize
    cfg = resolve_config("demo", ["image.resolution=32", "image.batch_size=16"])
    tokenize(cfg, root / "raw", root / "out", quiet=True)


def write_reader_shards(root: Path, samples: int) -> None:
    from bench.bench_reader import make_samples, write_shards
    write_shards(root / "shards", make_samples(samples))


def run_reader(root: Path, samples: int) -> None:
    from shards.reader import ShardReader
    with ShardReader(root / "shards", batch_size=32, split="all", seed=0) as reader:
        for _ in reader:
            pass


# kind -> (prepare the input, the measured work): each runs in its own process
CHILDREN = {"tokenize": (write_demo, run_tokenize), "reader": (write_reader_shards, run_reader)}


def child(kind: str, step: int, size: int, root: Path) -> float:
    CHILDREN[kind][step](root, size)
    return peak_rss_mib()


def measure(kind: str, size: int) -> tuple[float, float]:
    """(peak RSS MiB, seconds) of the process doing `kind` at `size` (its input prepared by
    another process beforehand)."""
    with tempfile.TemporaryDirectory() as tmp:
        run_child(kind, 0, size, tmp)
        t0 = time.perf_counter()
        rss = run_child(kind, 1, size, tmp)
        return rss, time.perf_counter() - t0


def run_child(kind: str, step: int, size: int, tmp: str) -> float:
    done = subprocess.run([sys.executable, "-m", "bench.bench_memory", "--child", kind, str(step),
                           str(size), tmp], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"bench memory child {kind} {size} failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.split()[-1])


def compare(kind: str, small: int, large: int, unit: str) -> None:
    (a, ta), (b, tb) = measure(kind, small), measure(kind, large)
    print(f"{kind}: peak RSS {a:.0f} MiB on {small} {unit} vs {b:.0f} MiB on {large} {unit} -> "
          f"ratio {b / a:.2f} (goal <= {GOAL}); {ta:.0f} s and {tb:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--episodes", default="10,100", help="tokenize: small,large demo episodes")
    p.add_argument("--samples", default="1000,10000", help="reader: small,large shard samples")
    p.add_argument("--child", nargs=4, metavar=("KIND", "STEP", "SIZE", "DIR"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, step, size, root = args.child
        print(f"{child(kind, int(step), int(size), Path(root)):.1f}")
        return
    compare("tokenize", *map(int, args.episodes.split(",")), "episodes")
    compare("reader", *map(int, args.samples.split(",")), "samples")


if __name__ == "__main__":
    main(sys.argv[1:])
