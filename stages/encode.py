"""The encode engine behind stage `pretokenize`, and its inverse for inspection (codes to PNG).

Layout it writes (docs/ARCHITECTURE.md): `codes/<episode_id>.npy` uint16 (n_kept, 2, h, w), one
atomic write per episode; with compat=published also `codes_wm/<episode_id>.npy` (world-model
fitting, aspect kept). The stage (stages/pretokenize.py) lists the jobs, skips finished ones and
writes `store.json`; this module encodes the rest:

    cfg, handle = for_rank(cfg, group)              # this rank's device, the VQ-GAN loaded there
    timing = encode_all(ctx, handle, Plan(cfg, raw, out, rank_share(todo, group), loader))

How it runs: a loader pump (pipeline.threads.background) reads and preprocesses the next
batches, an encoder pump runs the VQ-GAN on them, and this thread assembles each finished
episode and writes it. Batches never cross an episode, so every episode's codes are the same
however episodes are split: `image.workers > 1` spreads episodes over spawned processes (one
model each; one GPU each when there are several), and under torchrun the ranks split them the
same way (`jobs[rank::world]`). Which batch size is used never changes the codes
(stages/vq_batch.py picks one when `image.batch_size` is unset). The VQ-GAN is loaded once per
process and weights (`vq_handle`).

    from stages.encode import decode_to_png                     # `rynn-pipe decode`
    decode_to_png("cache/pretokenize/<key>", "task__demo_0", "png", frames=[0, 5])
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import queue
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from pipeline.config import ConfigView, ImageConfig
from pipeline.episode import VIEWS, Episode, EpisodeRef
from pipeline.errors import DataError
from pipeline.group import Group
from pipeline.io import npy_bytes, read_json, write_bytes
from pipeline.media import png_bytes
from pipeline.runner import Context
from pipeline.threads import background, limit_threads, local_processes, threads_per_process
from shards import vq
from shards.fit import fit_vla, fit_wm
from shards.vq_decoder import decode
from stages.vq_batch import best_batch_size

STORE = "store.json"
CODES_DIR = "codes"
WM_CODES_DIR = "codes_wm"
PREFETCH = 4  # batches the loader (and the encoder) may run ahead of their consumer


def codes_file(episode_id: str) -> str:
    return f"{CODES_DIR}/{episode_id}.npy"


def wm_codes_file(episode_id: str) -> str:
    return f"{WM_CODES_DIR}/{episode_id}.npy"


@dataclass(frozen=True)
class Job:
    """One episode to encode: where to read it and which raw observation rows are kept."""

    id: str
    ref: EpisodeRef
    rows: np.ndarray  # obs_index, int64
    fit: str = "square"                      # "square" (default), "vla" or "wm" (compat=published)
    grid: tuple[int, int] | None = None      # (rows, cols) of codes when not the square side

    @property
    def images(self) -> int:
        return len(self.rows) * len(VIEWS)

    @property
    def file(self) -> str:
        return wm_codes_file(self.id) if self.fit == "wm" else codes_file(self.id)


@dataclass(frozen=True)
class Plan:
    """What one process encodes and how."""

    cfg: ConfigView                     # the stage's view of the RunConfig
    raw: Path | None
    out: Path
    jobs: list[Job]
    loader: str                         # reader "module:function" (root, ref, SourceConfig) -> Episode


@dataclass
class Timing:
    encodes: int = 0
    encode_s: float = 0.0
    wait_s: float = 0.0             # the encoder waiting for the loader

    def add(self, other: "Timing") -> None:
        self.encodes += other.encodes
        self.encode_s += other.encode_s
        self.wait_s += other.wait_s


# ---------------------------------------------------------------------------------------------
# The VQ-GAN of this process, its device and this rank's share.
# ---------------------------------------------------------------------------------------------

_LOADED: dict[tuple, vq.VQHandle] = {}      # at most one: the weights last asked for


def _vq_key(image: ImageConfig | ConfigView) -> tuple:
    if image.vq_path is None:
        return ("random", image.vq_random_arch, image.vq_seed)
    path = Path(image.vq_path).resolve()
    files = sorted(path.iterdir()) if path.is_dir() else [path, path.with_suffix(".yaml"),
                                                          path.parent / "vqgan.yaml"]
    return ("path", str(path), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                     for p in files if p.is_file()))


def vq_handle(image: ImageConfig | ConfigView, device: str | None = None) -> vq.VQHandle:
    """The VQ-GAN of `image` (vq_path, or the seeded random arch), moved to `device` when given.

    Loaded once per process for the same weights (files' size and mtime), so the stage's digest
    and its encoding share one load; only the last weights asked for stay in memory.
    """
    key = _vq_key(image)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = vq.load_vq(image.vq_path, random_arch=image.vq_random_arch,
                                  seed=image.vq_seed, device="cpu")
    handle = _LOADED[key]
    if device is not None and vq.resolve_device(device) != handle.device:
        vq.to_device(handle, device)
    return handle


def rank_device(device: str, world: int) -> str:
    """Under torchrun with `auto` device and GPUs, each rank takes cuda:LOCAL_RANK."""
    if world > 1 and device == "auto" and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return device


def for_rank(cfg: ConfigView, group: Group) -> tuple[ConfigView, vq.VQHandle]:
    """`cfg` with this rank's device (its workers share it) and the VQ-GAN loaded there."""
    image = cfg.image.replace(device=rank_device(cfg.image.device, group.world))
    return cfg.replace(image=image), vq_handle(image, image.device)


def rank_share(jobs: Sequence[Job], group: Group) -> list[Job]:
    """This rank's episodes: `jobs[rank::world]` (fixed, whatever is already done)."""
    return list(jobs[group.rank::group.world])


def grid_side(resolution: int, handle: vq.VQHandle) -> int:
    return resolution // handle.grid


# ---------------------------------------------------------------------------------------------
# Batches of one episode.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Batch:
    job: Job
    index: int        # batch number within the episode
    count: int        # batches in the episode
    pixels: Any       # torch float (B, 3, R, R)


def resolve_loader(spec: str) -> Callable[..., Episode]:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def episode_frames(episode: Episode, job: Job) -> np.ndarray:
    """(n_kept * 2, H, W, 3) uint8, frame-major then view, in training orientation."""
    views = []
    for view in VIEWS:
        frames = np.asarray(episode.load_frames(view, job.rows))
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[0] != len(job.rows) \
                or frames.shape[-1] != 3:
            raise DataError(f"reader returned {frames.dtype} {frames.shape} for view {view!r}; "
                            f"expected uint8 ({len(job.rows)}, H, W, 3)", episode=job.id)
        views.append(frames)
    stacked = np.stack(views, axis=1)
    return stacked.reshape(-1, *stacked.shape[2:])


def fitted_frames(frames: np.ndarray, job: Job, resolution: int, crop_seed: int) -> np.ndarray:
    """compat=published: the job's frames through the published VLA or world-model fitting."""
    if job.fit == "vla":
        return np.stack([fit_vla(f, resolution) for f in frames])
    keys = [(crop_seed, job.id, int(job.rows[i // len(VIEWS)]), VIEWS[i % len(VIEWS)])
            for i in range(len(frames))]
    return np.stack([fit_wm(f, resolution, k) for f, k in zip(frames, keys)])


def episode_batches(episode: Episode, job: Job, resolution: int, batch_size: int,
                    crop_seed: int = 0) -> Iterator[Batch]:
    """Fixed per-episode batches (never crossing episodes: results independent of the split)."""
    frames = episode_frames(episode, job)
    if job.fit != "square":
        frames = fitted_frames(frames, job, resolution, crop_seed)
    starts = range(0, len(frames), batch_size)
    for i, start in enumerate(starts):
        chunk = frames[start:start + batch_size]
        pixels = vq.preprocess(chunk, resolution) if job.fit == "square" \
            else vq.normalize_pixels(chunk)
        yield Batch(job, i, len(starts), pixels)


# ---------------------------------------------------------------------------------------------
# One process: loader pump -> encoder pump -> episode writes (this thread).
# ---------------------------------------------------------------------------------------------

def encode_plan(handle: vq.VQHandle, plan: Plan,
                on_batch: Callable[[int], None] = lambda n: None) -> Timing:
    """Encode every job of the plan into `plan.out`; returns encode count and timings."""
    side = grid_side(plan.cfg.image.resolution, handle)
    for job in plan.jobs:
        if not len(job.rows):
            write_bytes(plan.out / job.file,
                        npy_bytes(np.zeros((0, len(VIEWS), *(job.grid or (side, side))),
                                           np.uint16)))
    timing = Timing()
    loaded = background(load_batches(plan, [j for j in plan.jobs if len(j.rows)]), PREFETCH,
                        name="pretokenize-loader")
    encoded = background(encode_batches(handle, loaded, plan.cfg.image.precision, timing),
                         PREFETCH, name="pretokenize-encoder")
    with closing(loaded), closing(encoded):
        write_episodes(plan.out, encoded, on_batch)
    return timing


def load_batches(plan: Plan, jobs: list[Job]) -> Iterator[Batch]:
    """Read (the reader orients), resize and normalize the jobs' batches, in order."""
    load = resolve_loader(plan.loader)
    image = plan.cfg.image
    for job in jobs:
        episode = load(plan.raw, job.ref, plan.cfg.source)
        yield from episode_batches(episode, job, image.resolution, image.batch_size,
                                   image.crop_seed)


def encode_batches(handle: vq.VQHandle, batches: Iterator[Batch], precision: str,
                   timing: Timing) -> Iterator[tuple[Batch, np.ndarray]]:
    """(batch, codes) for each batch; counts encodes and the time spent encoding and waiting."""
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        t1 = time.perf_counter()
        timing.wait_s += t1 - t0
        if batch is None:
            return
        codes = vq.encode(handle, batch.pixels, precision=precision).numpy()
        timing.encode_s += time.perf_counter() - t1
        timing.encodes += len(codes)
        yield batch, codes


def write_episodes(out: Path, encoded: Iterator[tuple[Batch, np.ndarray]],
                   on_batch: Callable[[int], None]) -> None:
    """Gather each episode's batches (they come in order) and write its codes file atomically."""
    parts: list[np.ndarray] = []
    for batch, codes in encoded:
        parts.append(codes)
        if batch.index == batch.count - 1:
            flat = np.concatenate(parts)
            arr = flat.reshape(len(batch.job.rows), len(VIEWS), *flat.shape[1:]).astype(np.uint16)
            write_bytes(out / batch.job.file, npy_bytes(arr))
            parts = []
        on_batch(len(codes))


# ---------------------------------------------------------------------------------------------
# This rank: thread share, batch size, one process or `image.workers` spawned ones.
# ---------------------------------------------------------------------------------------------

def encode_all(ctx: Context, handle: vq.VQHandle, plan: Plan) -> Timing:
    """Encode the plan's jobs under a progress bar, in this process or `image.workers` ones."""
    workers = min(plan.cfg.image.workers, len(plan.jobs))
    # This process runs (or measures for) one of the workers: its share of the threads.
    limit_threads(local_processes() * max(1, workers))
    if not plan.jobs:
        return Timing()
    plan = Plan(with_batch_size(ctx, plan.cfg, handle), plan.raw, plan.out, plan.jobs,
                plan.loader)
    with ctx.progress(sum(j.images for j in plan.jobs), "pretokenize") as bar:
        if workers > 1:
            return encode_parallel(plan, workers, bar)
        return encode_plan(handle, plan, on_batch=bar.advance)


def with_batch_size(ctx: Context, cfg: ConfigView, handle: vq.VQHandle) -> ConfigView:
    """`image.batch_size` when set, else the fastest measured here (stages/vq_batch.py)."""
    image = cfg.image
    if image.batch_size is not None:
        size, how = image.batch_size, "image.batch_size"
    else:
        size, how = best_batch_size(handle, image.resolution, image.precision)
    ctx.log(f"pretokenize: encoder batch size {size} ({how})")
    return cfg.replace(image=image.replace(batch_size=size))


_PROGRESS = None


def _init_worker(progress_queue, threads: int) -> None:
    global _PROGRESS
    _PROGRESS = progress_queue
    torch.set_num_threads(threads)  # its share of the thread budget (pipeline/threads.py)


def _worker(plan: Plan, device: str) -> Timing:
    return encode_plan(vq_handle(plan.cfg.image, device), plan, on_batch=_PROGRESS.put)


def split(jobs: Sequence[Job], parts: int) -> list[list[Job]]:
    """Round-robin by episode (deterministic; results do not depend on it)."""
    return [list(jobs[i::parts]) for i in range(parts) if jobs[i::parts]]


def worker_devices(device: str, n: int) -> list[str]:
    dev = vq.resolve_device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.device_count() > 1:
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(n)]
    return [str(dev)] * n


def encode_parallel(plan: Plan, workers: int, bar) -> Timing:
    """Spread the plan's episodes over spawned processes; each writes its own codes files."""
    ctx = mp.get_context("spawn")
    progress = ctx.Queue()
    parts = split(plan.jobs, workers)
    threads = threads_per_process(local_processes() * len(parts))
    devices = worker_devices(plan.cfg.image.device, len(parts))
    total = Timing()
    with ProcessPoolExecutor(len(parts), mp_context=ctx, initializer=_init_worker,
                             initargs=(progress, threads)) as pool:
        futures = [pool.submit(_worker, Plan(plan.cfg, plan.raw, plan.out, part, plan.loader), dev)
                   for part, dev in zip(parts, devices)]
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            _drain(progress, bar)
            for fut in done:
                fut.result()  # a worker's error surfaces at once
        for fut in futures:
            total.add(fut.result())
    return total


def _drain(progress, bar) -> None:
    while True:
        try:
            bar.advance(progress.get_nowait())
        except queue.Empty:
            return


# ---------------------------------------------------------------------------------------------
# Inspection: codes back to pixels (`rynn-pipe decode`).
# ---------------------------------------------------------------------------------------------

def read_codes(store_dir: Path, episode_id: str) -> np.ndarray:
    path = Path(store_dir) / codes_file(episode_id)
    if not path.exists():
        raise DataError("episode not in the frame-token store", file=str(path), episode=episode_id)
    return np.load(path, allow_pickle=False)


def decode_store_episode(store_dir: str | Path, episode_id: str, frames: Sequence[int] | None,
                         handle: vq.VQHandle) -> np.ndarray:
    """uint8 (len(frames), 2, H, W, 3): stored codes of an episode decoded (all frames if None)."""
    store = read_json(Path(store_dir) / STORE)
    if store["vq"]["digest"] != handle.digest:
        raise DataError(f"the store was encoded with VQ weights {store['vq']['digest'][:12]} but "
                        f"the given VQ-GAN is {handle.digest[:12]}; pass the same image.vq_path",
                        file=str(Path(store_dir) / STORE))
    codes = read_codes(Path(store_dir), episode_id)
    picked = codes if frames is None else codes[list(frames)]
    images = decode(handle, picked.reshape(-1, *picked.shape[2:]))
    return images.reshape(len(picked), len(VIEWS), *images.shape[1:])


def decode_to_png(store_dir: str | Path, episode_id: str, out_dir: str | Path, *,
                  frames: Sequence[int] | None = None, vq_path: str | None = None,
                  vq_random_arch: str = "full", vq_seed: int = 0,
                  device: str = "auto") -> list[Path]:
    """Write `<episode>_<frame>_<view>.png` for stored frames; the library side of `rynn-pipe decode`."""
    image = ImageConfig(vq_path=vq_path, vq_random_arch=vq_random_arch, vq_seed=vq_seed)
    images = decode_store_episode(store_dir, episode_id, frames, vq_handle(image, device))
    indices = range(len(images)) if frames is None else list(frames)
    paths = []
    for frame, pair in zip(indices, images):
        for view, img in zip(VIEWS, pair):
            path = Path(out_dir) / f"{episode_id}_{frame:06d}_{view}.png"
            write_bytes(path, png_bytes(img))
            paths.append(path)
    return paths
