"""Bench `vq`: the pretokenize stage vs the best bare encoder vs the published batch-1 loop.

All run in one process on the same frames: the demo suite (`sim.demo_data`, 4 demos x 24
steps) through the real `filter` stage when that module exists, else synthetic 128x128 episodes;
the demo recipe's 128 px and small random VQ-GAN unless `--resolution` / `--arch full`.

- bare encoder (the limit): the frames preprocessed beforehand through `encode` only, swept over
  batch sizes (`--sizes`, best of two interleaved rounds) in fp32, the stage's precision; the best
  is the reference. bf16-mixed is timed at that batch and shown with its code agreement (it
  changes codes, so it is not the reference);
- the stage: its encode pipeline (stages/encode.py: reader in a loader thread, encoder thread,
  codes files written by the calling thread) on a fresh output directory, at the batch size the stage picks itself
  (stages/vq_batch.py, measured afresh into the bench's temporary directory, as on a first run)
  unless `--batch-size`;
- published style: every VLA sample (history M=2) and world-model sample (frame t -> t+1) encodes
  each (frame, view) it uses anew with batch size 1; timed on a prefix and extrapolated (only the
  encodes and their preprocessing are counted, not its image loading or pickle writing).

    python -m bench vq                      # or: python -m bench.bench_vq --arch full --sizes 1,4
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipeline.config import RunConfig, demo
from pipeline.episode import VIEWS, Episode, EpisodeRef
from pipeline.io import write_json, write_npz
from pipeline.runner import Runner
from pipeline.threads import limit_threads
from shards import vq
from stages import encode, pretokenize
from stages import filter as filter_stage
from stages.vq_batch import best_batch_size

SYNTH_HW = 128
HISTORY = 2


def synthetic_load(root, ref: EpisodeRef, source_cfg) -> Episode:
    """Smooth moving gradients plus noise; deterministic per (episode, view, row)."""
    def load_frames(view, rows):
        out = []
        for r in rows:
            rng = np.random.default_rng([int(ref.key.rsplit("_", 1)[1]), VIEWS.index(view), int(r)])
            yy, xx = np.mgrid[0:SYNTH_HW, 0:SYNTH_HW]
            base = (xx + yy + 4 * int(r)) % 256
            img = np.stack([base, xx * 2 % 256, yy * 2 % 256], -1) + rng.integers(0, 16, (SYNTH_HW, SYNTH_HW, 3))
            out.append(np.clip(img, 0, 255).astype(np.uint8)[::-1, ::-1])
        return np.stack(out)
    n = ref.length
    return Episode(ref=ref, instruction="bench", actions=np.zeros((n, 7)), states=np.zeros((n, 8)),
                   obs_after_action=False, load_frames=load_frames, image_size=(SYNTH_HW, SYNTH_HW))


def synthetic_filter(root: Path, episodes: int, frames: int) -> Path:
    rows = []
    for i in range(episodes):
        ref = EpisodeRef(source="bench_demo.hdf5", key=f"demo_{i}", task="bench", length=frames)
        rows.append({"id": ref.episode_id, "source": ref.source, "key": ref.key, "task": "bench",
                     "n_raw": frames, "n_kept": frames, "file": f"ep/{ref.episode_id}.npz"})
        write_npz(root / rows[-1]["file"], obs_index=np.arange(frames, dtype=np.int64))
    write_json(root / "episodes.json", {"schema": 1, "format": "synthetic", "episodes": rows})
    return root


def prepare(cfg: RunConfig, work: Path, args) -> tuple[Path, Path]:
    """(raw root, filter output): the demo suite through `filter` if available, else synthetic."""
    raw = work / "raw"
    raw.mkdir()
    if args.source == "auto":
        args.source = "demo" if importlib.util.find_spec("sim.demo_data") else "synthetic"
    if args.source == "synthetic":
        pretokenize.LOADER = f"{__name__}:synthetic_load"
        print(f"frames: synthetic ({args.episodes} episodes x {args.frames} frames, "
              f"{SYNTH_HW}x{SYNTH_HW})")
        return raw, synthetic_filter(work / "filter", args.episodes, args.frames)
    from sim.demo_data import write_demo_suite
    steps = max(24, args.frames)  # the demo suite records at least 24 steps per demo
    write_demo_suite(raw, tasks=1, demos=args.episodes, steps=steps)
    done = Runner(cfg, [filter_stage.STAGE], raw=raw, cache=work / "cache", quiet=True).run()
    print(f"frames: the demo suite (sim.demo_data, 1 task x {args.episodes} demos x "
          f"{steps} steps) through the filter stage")
    return raw, done["filter"]


def time_end_to_end(cfg: RunConfig, raw: Path, filt: Path, out: Path, handle) -> tuple[float, int]:
    jobs = pretokenize.read_jobs(filt)
    out.mkdir()
    plan = encode.Plan(cfg, raw, out, jobs, pretokenize.LOADER)
    t0 = time.perf_counter()
    timing = encode.encode_plan(handle, plan)
    seconds = time.perf_counter() - t0
    print(f"  stage: encoder busy {timing.encode_s:.1f} s, waited on I/O {timing.wait_s:.2f} s "
          f"of {seconds:.1f} s")
    return seconds, timing.encodes


def preloaded_pixels(cfg: RunConfig, raw: Path, filt: Path) -> torch.Tensor:
    """Every (frame, view) of the stage's input, preprocessed: (N, 3, R, R) float32."""
    load = encode.resolve_loader(pretokenize.LOADER)
    frames = [encode.episode_frames(load(raw, job.ref, cfg.source), job)
              for job in pretokenize.read_jobs(filt)]
    return vq.preprocess(np.concatenate(frames), cfg.image.resolution)


def bare_rate(handle, pixels: torch.Tensor, batch: int, precision: str, min_s: float) -> float:
    """Images/s of `encode` alone over consecutive batches of `pixels`, until `min_s` seconds
    and at least one batch have passed (no warm-up: callers keep the best of several rounds)."""
    done, start, t0 = 0, 0, time.perf_counter()
    while done == 0 or time.perf_counter() - t0 < min_s:
        chunk = pixels[start:start + batch]
        if len(chunk) < batch:            # wrap around: always full batches
            start, chunk = 0, pixels[:batch]
        vq.encode(handle, chunk, precision=precision)
        done, start = done + len(chunk), start + batch
    return done / (time.perf_counter() - t0)


def sweep_bare(handle, pixels: torch.Tensor, sizes: list[int], min_s: float,
               rounds: int = 2) -> dict[int, float]:
    """{batch: fp32 images/s}, best of interleaved rounds (the first warms up; the machine may be
    shared), for every batch size that fits the frames."""
    fits = [b for b in sizes if b <= len(pixels)]
    rates = {b: 0.0 for b in fits}
    for _ in range(rounds):
        for b in fits:
            rates[b] = max(rates[b], bare_rate(handle, pixels, b, "fp32", min_s))
    return rates


def published_encodes(cfg: RunConfig, raw: Path, filt: Path) -> list[tuple[np.ndarray, int]]:
    """(frame uint8, episode frame count) for every encode the per-sample pipeline performs."""
    load = encode.resolve_loader(pretokenize.LOADER)
    items = []
    for job in pretokenize.read_jobs(filt):
        frames = encode.episode_frames(load(raw, job.ref, cfg.source), job)
        per_frame = frames.reshape(len(job.rows), len(VIEWS), *frames.shape[1:])
        n = len(job.rows)
        vla = [range(t - HISTORY + 1, t + 1) for t in range(HISTORY - 1, n)]
        wm = [(t, t + 1) for t in range(n - 1)]
        for used in [*vla, *wm]:
            items += [per_frame[f, v] for f in used for v in range(len(VIEWS))]
    return items


def time_published(handle, items, resolution: int, sample: int) -> float:
    """Seconds for all items at batch size 1, extrapolated from the first `sample`."""
    timed = items[:sample]
    t0 = time.perf_counter()
    for frame in timed:
        vq.encode(handle, vq.preprocess(frame[None], resolution))
    return (time.perf_counter() - t0) * len(items) / max(1, len(timed))


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_vq", description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=["small", "full"], default="small")
    p.add_argument("--source", choices=["auto", "demo", "synthetic"], default="auto",
                   help="auto: the demo suite when sim.demo_data exists, else synthetic")
    p.add_argument("--resolution", type=int, default=None, help="default: the demo recipe's")
    p.add_argument("--batch-size", type=int, default=None,
                   help="the stage's batch; default: its own measured choice (stages/vq_batch.py)")
    p.add_argument("--sizes", default="1,2,4,8,16", help="bare-encoder batch sizes to sweep")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds per sweep point")
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--published-sample", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="timing rounds of the stage (best kept)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv or [])
    cfg = demo()
    image = replace(cfg.image, resolution=args.resolution or cfg.image.resolution,
                    vq_random_arch=args.arch, batch_size=args.batch_size)
    cfg = replace(cfg, image=image)
    handle = vq.load_vq(None, random_arch=args.arch, seed=0)
    limit_threads()
    print(f"VQ-GAN: random '{args.arch}' arch on {handle.device}, {image.resolution} px, "
          f"{torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        raw, filt = prepare(cfg, work, args)
        report(cfg, handle, raw, filt, work, args)


def report(cfg: RunConfig, handle, raw: Path, filt: Path, work: Path, args) -> None:
    pixels = preloaded_pixels(cfg, raw, filt)
    rates = sweep_bare(handle, pixels, [int(b) for b in args.sizes.split(",")], args.min_time)
    print("bare encoder fp32: " + "  ".join(f"b{b} {r:.2f}" for b, r in rates.items())
          + " images/s")
    best_b = max(rates, key=rates.get)
    bf16 = max(bare_rate(handle, pixels, best_b, "bf16-mixed", args.min_time) for _ in range(2))
    best_s = max(bare_rate(handle, pixels, best_b, "fp32", args.min_time) for _ in range(2))
    rates[best_b] = max(rates[best_b], best_s)
    agree = vq.agreement(handle, pixels[:best_b])
    print(f"bare encoder bf16-mixed at batch {best_b}: {bf16:.2f} images/s "
          f"({bf16 / rates[best_b]:.2f}x fp32), code agreement with fp32 {agree:.1%} "
          "(changes codes: not the reference)")
    if cfg.image.batch_size is None:     # measured now, as on a first run (not a stale file)
        chosen, how = best_batch_size(handle, cfg.image.resolution, cfg.image.precision,
                                      path=work / "vq_batch.json")
        cfg = replace(cfg, image=replace(cfg.image, batch_size=chosen))
    else:
        chosen, how = cfg.image.batch_size, "--batch-size"
    runs = [time_end_to_end(cfg, raw, filt, work / f"e2e-{i}", handle) for i in range(args.repeats)]
    e2e_s, images = min(runs)
    e2e, best = images / e2e_s, rates[best_b]
    print(f"pretokenize stage (batch {chosen}, {how}): {e2e:.2f} images/s; best bare fp32 "
          f"encoder (batch {best_b}): {best:.2f} images/s; ratio {e2e / best:.2f} (goal >= 0.9)")
    items = published_encodes(cfg, raw, filt)
    pub_s = min(time_published(handle, items, cfg.image.resolution, args.published_sample)
                for _ in range(2))                     # best of two rounds, as the others
    print(f"published-style batch-1 per-sample re-encode: {len(items) / pub_s:.2f} images/s, "
          f"{len(items) / images:.1f} encodes per unique (frame, view); stage speedup per unique "
          f"frame {pub_s / e2e_s:.1f}x (goal >= 4x)")


if __name__ == "__main__":
    main(sys.argv[1:])
