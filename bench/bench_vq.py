"""Bench `vq`: pretokenize end to end vs the bare encoder vs the published batch-1 re-encode loop.

All three run in one process on the same frames: the demo suite (`sim.demo_data`) through the
real `filter` stage when that module exists, else synthetic 128x128 episodes. The VQ-GAN is the
small random arch unless `--arch full`.

- end to end: the stage's encode pipeline (reader + resize in a loader thread, encoder, writer
  thread writing codes files) on a fresh output directory; also the whole stage incl. model load;
- bare encoder: the same batches, preprocessed beforehand, through `encode` only (the limit);
- published style: every VLA sample (history M=2) and world-model sample (frame t -> t+1) encodes
  each (frame, view) it uses anew with batch size 1; timed on a prefix and extrapolated (only the
  encodes are counted, not its per-sample image loading or pickle writing).

    python -m bench vq                      # or: python -m bench.bench_vq --arch full
"""

from __future__ import annotations

import argparse
import importlib.util
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
from shards import vq
from stages import pretokenize

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
    from stages import filter as filter_stage
    steps = max(24, args.frames)  # the demo suite records at least 24 steps per demo
    write_demo_suite(raw, tasks=1, demos=args.episodes, steps=steps)
    done = Runner(cfg, [filter_stage.STAGE], raw=raw, cache=work / "cache", quiet=True).run()
    print(f"frames: the demo suite (sim.demo_data, 1 task x {args.episodes} demos x "
          f"{steps} steps) through the filter stage")
    return raw, done["filter"]


def time_end_to_end(cfg: RunConfig, raw: Path, filt: Path, out: Path, handle) -> tuple[float, int]:
    jobs = pretokenize.read_jobs(filt)
    out.mkdir()
    plan = pretokenize.Plan(cfg, raw, out, jobs, pretokenize.LOADER)
    t0 = time.perf_counter()
    timing = pretokenize.encode_plan(handle, plan)
    seconds = time.perf_counter() - t0
    print(f"  encoder busy {timing.encode_s:.1f} s, waited on I/O {timing.wait_s:.2f} s")
    return seconds, timing.encodes


def time_stage(cfg: RunConfig, raw: Path, filt: Path, work: Path) -> float:
    out = work / "stage"
    out.mkdir()
    t0 = time.perf_counter()
    pretokenize.run(pretokenize.STAGE.context(cfg, raw=raw, inputs={"filter": filt}, out=out, quiet=True))
    return time.perf_counter() - t0


def preloaded_batches(cfg: RunConfig, raw: Path, filt: Path) -> list[torch.Tensor]:
    load = pretokenize.resolve_loader(pretokenize.LOADER)
    out = []
    for job in pretokenize.read_jobs(filt):
        episode = load(raw, job.ref, cfg.source)
        out += [b.pixels for b in pretokenize.episode_batches(episode, job, cfg.image.resolution,
                                                              cfg.image.batch_size)]
    return out


def time_bare(handle, batches: list[torch.Tensor], precision: str = "fp32") -> float:
    t0 = time.perf_counter()
    for batch in batches:
        vq.encode(handle, batch, precision=precision)
    return time.perf_counter() - t0


def published_encodes(cfg: RunConfig, raw: Path, filt: Path) -> list[tuple[np.ndarray, int]]:
    """(frame uint8, episode frame count) for every encode the per-sample pipeline performs."""
    load = pretokenize.resolve_loader(pretokenize.LOADER)
    items = []
    for job in pretokenize.read_jobs(filt):
        frames = pretokenize.episode_frames(load(raw, job.ref, cfg.source), job)
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
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--episodes", type=int, default=3)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--published-sample", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="alternating timing rounds (best kept)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv or [])
    cfg = demo()
    cfg = replace(cfg, image=replace(cfg.image, resolution=args.resolution, vq_random_arch=args.arch,
                                     batch_size=args.batch_size))
    handle = vq.load_vq(None, random_arch=args.arch, seed=0)
    print(f"VQ-GAN: random '{args.arch}' arch on {handle.device}, {args.resolution} px, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        raw, filt = prepare(cfg, work, args)
        report(cfg, handle, raw, filt, work, args)


def report(cfg: RunConfig, handle, raw: Path, filt: Path, work: Path, args) -> None:
    batches = preloaded_batches(cfg, raw, filt)
    vq.encode(handle, batches[0])  # warm-up
    runs = []
    for i in range(args.repeats):  # alternate, keep the best of each: the machine is shared
        runs.append((time_end_to_end(cfg, raw, filt, work / f"e2e-{i}", handle),
                     time_bare(handle, batches)))
    e2e_s, images = min(r[0] for r in runs)
    bare_s = min(r[1] for r in runs)
    stage_s = time_stage(cfg, raw, filt, work)
    e2e, bare = images / e2e_s, images / bare_s
    print(f"pretokenize end-to-end: {e2e:.2f} img/s; bare encoder: {bare:.2f} img/s; "
          f"ratio {e2e / bare:.2f} (goal >= 0.9)")
    print(f"whole stage incl. VQ load and store.json: {images / stage_s:.2f} img/s ({stage_s:.1f} s)")
    items = published_encodes(cfg, raw, filt)
    pub_s = time_published(handle, items, cfg.image.resolution, args.published_sample)
    print(f"published-style batch-1 per-sample re-encode: {len(items) / pub_s:.2f} img/s "
          f"(encodes {len(items)}); encodes per unique frame {len(items) / images:.1f}; "
          f"speedup {pub_s / e2e_s:.1f} x")
    bf16_s = time_bare(handle, batches, precision="bf16-mixed")
    share = np.mean([vq.agreement(handle, b) for b in batches[:2]])
    print(f"bf16-mixed bare encoder: {images / bf16_s:.2f} img/s ({bare_s / bf16_s:.2f} x fp32); "
          f"code agreement with fp32 {share:.1%}")


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
