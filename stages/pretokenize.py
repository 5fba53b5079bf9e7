"""Stage `pretokenize`: encode every kept (episode, frame, view) with the VQ-GAN exactly once.

Output (docs/ARCHITECTURE.md): `codes/<episode_id>.npy` uint16 (n_kept, 2, h, w), views
("front", "wrist"), frame i = raw observation row `obs_index[i]` of the filter output; and
`store.json` (VQ digest, untrained flag, architecture, resolution, orientation, preprocessing,
encodes, unique pairs, per-episode frame counts). Conversations and shards are built from this
store, so changing history, chunk size, prompts or the VLA/world-model mix never re-encodes.

How it runs: a loader thread reads and preprocesses the next batches while the encoder (main
thread) works, and a writer thread assembles and atomically writes each finished episode.
Batches never cross an episode, so every episode's codes are the same however episodes are split:
`image.workers > 1` spreads episodes over processes (spawned, one model each; one GPU each when
there are several) whose only shared output is `store.json`, written last. Under torchrun
(`RANK`/`WORLD_SIZE`, pipeline/group.py) the ranks split the episodes the same way, across
machines sharing the cache's file system, and rank 0 writes `store.json`. Episodes whose codes file already exists in `ctx.out` (a
crashed run) are skipped, so a rerun encodes only unfinished episodes.

With compat=published every frame is fitted as the published processors do (`shards.fit`):
`codes/` holds the VLA fitting (square), and `codes_wm/<episode_id>.npy` the world-model fitting
(aspect kept, e.g. (n_kept, 2, 14, 18) for 640 x 480 at 256) for episodes whose frames are not
256 x 256 (for those the two fittings are the same pixels, encoded once); `store.json` then adds
`fit` and `wm_grids` {episode: [rows, cols]}.

    rynn-pipe tokenize --raw demos --until pretokenize          # via the runner
    from stages.pretokenize import decode_store_episode         # codes back to pixels
"""

from __future__ import annotations

import importlib
import os
import queue
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from pipeline.config import ConfigView, ImageConfig, digest
from pipeline.episode import VIEWS, Episode, EpisodeRef
from pipeline.errors import DataError
from pipeline.io import load_npz, npy_bytes, read_json, write_bytes, write_json
from pipeline.runner import Context, Result, Stage, raw_fingerprint
from pipeline.threads import limit_threads, local_processes, threads_per_process

SCHEMA = 1
STORE = "store.json"
CODES_DIR = "codes"
WM_CODES_DIR = "codes_wm"
PREFETCH = 4  # batches the loader may run ahead of the encoder
# Reader entry point "module:function" (root, ref, SourceConfig) -> Episode; tests and the bench
# point it at synthetic episodes (it must be importable in spawned worker processes).
LOADER = "stages.source:load"


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


# ---------------------------------------------------------------------------------------------
# Inputs, digests and estimates.
# ---------------------------------------------------------------------------------------------

def read_jobs(filter_dir: Path) -> list[Job]:
    """Episodes and kept observation rows from the `filter` output, in its order."""
    doc = read_json(filter_dir / "episodes.json")
    jobs = []
    for row in doc["episodes"]:
        ref = EpisodeRef(source=row["source"], key=row["key"], task=row["task"],
                         length=int(row["n_raw"]))
        rows = load_npz(filter_dir / row["file"])["obs_index"].astype(np.int64)
        if len(rows) != row["n_kept"]:
            raise DataError(f"obs_index has {len(rows)} rows but episodes.json says n_kept="
                            f"{row['n_kept']}", file=str(filter_dir / row["file"]), episode=row["id"])
        jobs.append(Job(id=row["id"], ref=ref, rows=rows))
    return jobs


def compat_jobs(jobs: list[Job], filter_dir: Path, cfg: ConfigView) -> list[Job]:
    """compat=published: every job with the VLA fitting, plus a world-model job for each episode
    whose frames are not 256 x 256 (shards.fit.shares_fit)."""
    from shards.fit import shares_fit, wm_grid
    if cfg.compat != "published":
        return jobs
    rows = read_json(filter_dir / "episodes.json")["episodes"]
    sizes = {r["id"]: tuple(r["image_hw"]) for r in rows}
    wm = [replace(j, fit="wm", grid=wm_grid(*sizes[j.id], cfg.image.resolution))
          for j in jobs if not shares_fit(*sizes[j.id])]
    return [replace(j, fit="vla") for j in jobs] + wm


_VQ_DIGESTS: dict[tuple, str] = {}


def _vq_key(image: ImageConfig) -> tuple:
    if image.vq_path is None:
        return ("random", image.vq_random_arch, image.vq_seed)
    path = Path(image.vq_path).resolve()
    files = sorted(path.iterdir()) if path.is_dir() else [path, path.with_suffix(".yaml"),
                                                          path.parent / "vqgan.yaml"]
    return ("path", str(path), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                     for p in files if p.is_file()))


def vq_digest(image: ImageConfig) -> str:
    """The VQ weight digest for a config (memoized per process on the files' size and mtime)."""
    key = _vq_key(image)
    if key not in _VQ_DIGESTS:
        from shards.vq import load_vq
        _VQ_DIGESTS[key] = load_vq(image.vq_path, random_arch=image.vq_random_arch,
                                   seed=image.vq_seed, device="cpu").digest
    return _VQ_DIGESTS[key]


def input_digest(ctx: Context) -> dict[str, str]:
    """Only which frames exist (episode ids + obs rows), the raw files and the VQ weights."""
    jobs = read_jobs(ctx.inputs["filter"])
    frames = digest([[j.id, j.rows.tolist()] for j in jobs])
    return {"frames": frames, "raw": raw_fingerprint(ctx.raw), "vq": vq_digest(ctx.cfg.image)}


def estimate(ctx: Context) -> dict[str, int]:
    rows = read_json(ctx.inputs["filter"] / "episodes.json")["episodes"]
    frames = sum(int(r["n_kept"]) for r in rows)
    jobs = compat_jobs([Job(r["id"], None, np.zeros(int(r["n_kept"]), np.int64)) for r in rows],
                       ctx.inputs["filter"], ctx.cfg)
    return {"episodes": len(rows), "frames": frames, "images": sum(j.images for j in jobs)}


# ---------------------------------------------------------------------------------------------
# Per-episode pieces.
# ---------------------------------------------------------------------------------------------

def codes_file(episode_id: str) -> str:
    return f"{CODES_DIR}/{episode_id}.npy"


def wm_codes_file(episode_id: str) -> str:
    return f"{WM_CODES_DIR}/{episode_id}.npy"


def grid_side(resolution: int, handle) -> int:
    return resolution // handle.grid


def is_done(out: Path, job: Job, side: int) -> bool:
    """True when a complete codes file for the job is already in `out` (written atomically)."""
    path = out / job.file
    if not path.exists():
        return False
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    return arr.dtype == np.uint16 and arr.shape == (len(job.rows), len(VIEWS), *(job.grid or
                                                                               (side, side)))


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


@dataclass
class Batch:
    job: Job
    index: int        # batch number within the episode
    count: int        # batches in the episode
    pixels: Any       # torch float (B, 3, R, R)


def fitted_frames(frames: np.ndarray, job: Job, resolution: int, crop_seed: int) -> np.ndarray:
    """compat=published: the job's frames through the published VLA or world-model fitting."""
    from shards.fit import fit_vla, fit_wm
    if job.fit == "vla":
        return np.stack([fit_vla(f, resolution) for f in frames])
    keys = [(crop_seed, job.id, int(job.rows[i // len(VIEWS)]), VIEWS[i % len(VIEWS)])
            for i in range(len(frames))]
    return np.stack([fit_wm(f, resolution, k) for f, k in zip(frames, keys)])


def episode_batches(episode: Episode, job: Job, resolution: int, batch_size: int,
                    crop_seed: int = 0) -> Iterator[Batch]:
    """Fixed per-episode batches (never crossing episodes: results independent of the split)."""
    from shards.vq import normalize_pixels, preprocess
    frames = episode_frames(episode, job)
    if job.fit != "square":
        frames = fitted_frames(frames, job, resolution, crop_seed)
    starts = range(0, len(frames), batch_size)
    for i, start in enumerate(starts):
        chunk = frames[start:start + batch_size]
        pixels = preprocess(chunk, resolution) if job.fit == "square" else normalize_pixels(chunk)
        yield Batch(job, i, len(starts), pixels)


# ---------------------------------------------------------------------------------------------
# The overlapped encode loop: loader thread -> encoder (this thread) -> writer thread.
# ---------------------------------------------------------------------------------------------

_DONE = object()


@dataclass
class _Failed:
    error: BaseException


@dataclass
class Plan:
    """What one process encodes and how."""

    cfg: ConfigView                     # the stage's view of the RunConfig
    raw: Path | None
    out: Path
    jobs: list[Job]
    loader: str = LOADER


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _produce(plan: Plan, q: queue.Queue, stop: threading.Event) -> None:
    """Loader thread: read, orient (the reader does), resize and normalize the next batches."""
    load = resolve_loader(plan.loader)
    image = plan.cfg.image
    try:
        for job in plan.jobs:
            episode = load(plan.raw, job.ref, plan.cfg.source)
            for batch in episode_batches(episode, job, image.resolution, image.batch_size,
                                         image.crop_seed):
                if not _put(q, batch, stop):
                    return
        _put(q, _DONE, stop)
    except Exception as exc:  # handed to the encoder thread, which re-raises it
        _put(q, _Failed(exc), stop)


def _write(out: Path, q: queue.Queue, errors: list[BaseException]) -> None:
    """Writer thread: gather an episode's batches, write its codes file atomically."""
    parts: dict[str, list[np.ndarray]] = {}
    while (item := q.get()) is not _DONE:
        job, index, count, codes = item
        try:
            parts.setdefault(job.id, []).append(codes)
            if index == count - 1:
                flat = np.concatenate(parts.pop(job.id))
                arr = flat.reshape(len(job.rows), len(VIEWS), *flat.shape[1:]).astype(np.uint16)
                write_bytes(out / job.file, npy_bytes(arr))
        except Exception as exc:  # reported to the encoder thread, which re-raises it
            errors.append(exc)


@dataclass
class Timing:
    encodes: int = 0
    encode_s: float = 0.0
    wait_s: float = 0.0

    def add(self, other: "Timing") -> None:
        self.encodes += other.encodes
        self.encode_s += other.encode_s
        self.wait_s += other.wait_s


def encode_plan(handle, plan: Plan, on_batch: Callable[[int], None] = lambda n: None) -> Timing:
    """Encode every job of the plan into `plan.out`; returns encode count and timings."""
    side = grid_side(plan.cfg.image.resolution, handle)
    for job in plan.jobs:
        if not len(job.rows):
            write_bytes(plan.out / job.file,
                        npy_bytes(np.zeros((0, len(VIEWS), *(job.grid or (side, side))),
                                           np.uint16)))
    plan = Plan(plan.cfg, plan.raw, plan.out, [j for j in plan.jobs if len(j.rows)], plan.loader)
    batches: queue.Queue = queue.Queue(maxsize=PREFETCH)
    writes: queue.Queue = queue.Queue()
    stop, errors = threading.Event(), []
    loader = threading.Thread(target=_produce, args=(plan, batches, stop), daemon=True)
    writer = threading.Thread(target=_write, args=(plan.out, writes, errors), daemon=True)
    loader.start()
    writer.start()
    try:
        return _encode_loop(handle, plan, batches, writes, errors, on_batch)
    finally:
        stop.set()
        writes.put(_DONE)
        writer.join()
        loader.join()


def _encode_loop(handle, plan: Plan, batches: queue.Queue, writes: queue.Queue,
                 errors: list[BaseException], on_batch: Callable[[int], None]) -> Timing:
    from shards.vq import encode
    timing = Timing()
    while True:
        t0 = time.perf_counter()
        item = batches.get()
        t1 = time.perf_counter()
        timing.wait_s += t1 - t0
        if item is _DONE:
            break
        if isinstance(item, _Failed):
            raise item.error
        codes = encode(handle, item.pixels, precision=plan.cfg.image.precision).numpy()
        timing.encode_s += time.perf_counter() - t1
        timing.encodes += len(codes)
        writes.put((item.job, item.index, item.count, codes))
        if errors:
            raise errors[0]
        on_batch(len(codes))
    return timing


# ---------------------------------------------------------------------------------------------
# Worker processes.
# ---------------------------------------------------------------------------------------------

_PROGRESS = None


def _init_worker(progress_queue, threads: int) -> None:
    import torch
    global _PROGRESS
    _PROGRESS = progress_queue
    torch.set_num_threads(threads)  # its share of the thread budget (pipeline/threads.py)


def _worker(plan: Plan, device: str) -> Timing:
    from shards.vq import load_vq
    image = plan.cfg.image
    handle = load_vq(image.vq_path, random_arch=image.vq_random_arch, seed=image.vq_seed,
                     device=device)
    return encode_plan(handle, plan, on_batch=_PROGRESS.put)


def split(jobs: Sequence[Job], parts: int) -> list[list[Job]]:
    """Round-robin by episode (deterministic; results do not depend on it)."""
    return [list(jobs[i::parts]) for i in range(parts) if jobs[i::parts]]


def worker_devices(device: str, n: int) -> list[str]:
    import torch
    from shards.vq import resolve_device
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.device_count() > 1:
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(n)]
    return [str(dev)] * n


def encode_parallel(plan: Plan, workers: int, bar) -> Timing:
    """Spread the plan's episodes over spawned processes; each writes its own codes files."""
    import multiprocessing as mp
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
# The stage.
# ---------------------------------------------------------------------------------------------

def store_doc(cfg: ConfigView, handle, jobs: list[Job], fmt: str) -> dict[str, Any]:
    """store.json: identical for any worker count or interruption (no timings, no paths)."""
    from shards.vq import PREPROCESSING
    side = grid_side(cfg.image.resolution, handle)
    pairs = sum(j.images for j in jobs)
    doc = {"schema": SCHEMA, "format": fmt, "views": list(VIEWS), "dtype": "uint16",
            "resolution": cfg.image.resolution, "grid": [side, side],
            "orientation": "rot180" if cfg.source.rotate_180 else "none",
            "preprocessing": PREPROCESSING,
            "vq": {"digest": handle.digest, "untrained": handle.untrained, "source": handle.source,
                   "arch": handle.arch, "precision": cfg.image.precision},
            # Each stored (frame, view) code grid came from exactly one encode.
            "encodes": pairs, "unique_pairs": pairs,
            "frames": sum(len(j.rows) for j in jobs if j.fit != "wm"),
            "episodes": [{"id": j.id, "frames": len(j.rows), "file": codes_file(j.id)}
                         for j in jobs if j.fit != "wm"]}
    if cfg.compat == "published":
        from shards.fit import PUBLISHED_PREPROCESSING
        doc.update(fit="published", preprocessing=PUBLISHED_PREPROCESSING,
                   crop_seed=cfg.image.crop_seed,
                   wm_grids={j.id: list(j.grid) for j in jobs if j.fit == "wm"})
    return doc


def run(ctx: Context) -> Result:
    """Encode the episodes not yet in `ctx.out`. Under torchrun every rank runs this on its
    share of the episodes (`jobs[rank::world]`, fixed whatever is already done) and rank 0,
    once all ranks are through, checks every episode is there and writes `store.json`."""
    from shards.vq import load_vq
    cfg, image, group = ctx.cfg, ctx.cfg.image, ctx.group
    jobs = compat_jobs(read_jobs(ctx.inputs["filter"]), ctx.inputs["filter"], cfg)
    image = image.replace(device=rank_device(image.device, group.world))
    cfg = cfg.replace(image=image)      # workers of this rank share its device
    handle = load_vq(image.vq_path, random_arch=image.vq_random_arch, seed=image.vq_seed,
                     device=image.device)
    side = grid_side(image.resolution, handle)
    if group.leader:
        for folder in (CODES_DIR, WM_CODES_DIR):      # a killed run's unfinished writes
            for debris in (ctx.out / folder).glob(".tmp-*"):
                debris.unlink()
    group.barrier()                                   # no rank writes before the debris is gone
    mine = jobs[group.rank::group.world]
    todo = [j for j in mine if not is_done(ctx.out, j, side)]
    if handle.untrained:
        ctx.warn("pretokenize: tokens come from an UNTRAINED (random-init) VQ-GAN")
    share = "" if group.world == 1 else f" (rank 0 of {group.world}; each rank its share)"
    ctx.log(f"pretokenize: {len(jobs)} episodes, {len(mine) - len(todo)} already encoded "
            f"(resumed), {sum(j.images for j in todo)} images to encode on {handle.device}{share}")
    # This process runs (or measures for) one of the workers: its share of the threads.
    limit_threads(local_processes() * max(1, min(image.workers, len(todo))))
    cfg = with_batch_size(ctx, cfg, handle) if todo else cfg
    timing = _encode_all(ctx, handle, Plan(cfg, ctx.raw, ctx.out, todo, LOADER))
    encodes, encode_s, wait_s, resumed = group.all_sum(
        [timing.encodes, timing.encode_s, timing.wait_s, len(mine) - len(todo)])
    timing = Timing(int(encodes), encode_s, wait_s)
    if not group.leader:
        return Result(counts={"encodes": timing.encodes})
    missing = [j.id for j in jobs if not is_done(ctx.out, j, side)]
    if missing:
        raise DataError(f"{len(missing)} episodes have no complete codes file after every rank "
                        f"finished, e.g. {missing[:3]}", file=str(ctx.out / CODES_DIR))
    fmt = read_json(ctx.inputs["filter"] / "episodes.json").get("format", "unknown")
    store = store_doc(cfg, handle, jobs, fmt)
    write_json(ctx.out / STORE, store)
    ctx.log(f"pretokenize: encodes {timing.encodes}, unique (frame, view) pairs "
            f"{store['unique_pairs']}, encoder waited {timing.wait_s:.1f} s of "
            f"{timing.wait_s + timing.encode_s:.1f} s")
    counts = {"episodes": len(store["episodes"]), "frames": store["frames"], "unique_pairs": store["unique_pairs"],
              "encodes": timing.encodes, "resumed_episodes": int(resumed)}
    extra = {"untrained_tokenizer": handle.untrained, "vq_digest": handle.digest,
             "encoder": {"encode_s": round(timing.encode_s, 3), "wait_s": round(timing.wait_s, 3)},
             "ranks": group.world}
    return Result(counts=counts, extra=extra)


def with_batch_size(ctx: Context, cfg: ConfigView, handle) -> ConfigView:
    """`image.batch_size` when set, else the fastest measured here (stages/vq_batch.py)."""
    from stages.vq_batch import best_batch_size
    image = cfg.image
    if image.batch_size is not None:
        size, how = image.batch_size, "image.batch_size"
    else:
        size, how = best_batch_size(handle, image.resolution, image.precision)
    ctx.log(f"pretokenize: encoder batch size {size} ({how})")
    return cfg.replace(image=image.replace(batch_size=size))


def rank_device(device: str, world: int) -> str:
    """Under torchrun with `auto` device and GPUs, each rank takes cuda:LOCAL_RANK."""
    import torch
    if world > 1 and device == "auto" and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return device


def _encode_all(ctx: Context, handle, plan: Plan) -> Timing:
    images = sum(j.images for j in plan.jobs)
    workers = min(ctx.cfg.image.workers, len(plan.jobs))
    with ctx.progress(images, "pretokenize") as bar:
        if workers > 1:
            return encode_parallel(plan, workers, bar)
        return encode_plan(handle, plan, on_batch=bar.advance)


STAGE = Stage(name="pretokenize", version="1",
              fields=("image.resolution", "image.vq_path", "image.vq_random_arch", "image.vq_seed",
                      "image.precision", "source.*", "compat", "image.crop_seed"),
              deps=("filter", "raw"), run=run, estimate=estimate, input_digest=input_digest,
              distributed=True, untracked=("image.workers", "image.device", "image.batch_size"))


# ---------------------------------------------------------------------------------------------
# Inspection: codes back to pixels (`rynn-pipe decode`).
# ---------------------------------------------------------------------------------------------

def read_codes(store_dir: Path, episode_id: str) -> np.ndarray:
    path = Path(store_dir) / codes_file(episode_id)
    if not path.exists():
        raise DataError("episode not in the frame-token store", file=str(path), episode=episode_id)
    return np.load(path, allow_pickle=False)


def decode_store_episode(store_dir: str | Path, episode_id: str, frames: Sequence[int] | None,
                         handle) -> np.ndarray:
    """uint8 (len(frames), 2, H, W, 3): stored codes of an episode decoded (all frames if None)."""
    from shards.vq_decoder import decode
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
    from shards.vq import load_vq
    from pipeline.media import png_bytes
    handle = load_vq(vq_path, random_arch=vq_random_arch, seed=vq_seed, device=device)
    images = decode_store_episode(store_dir, episode_id, frames, handle)
    indices = range(len(images)) if frames is None else list(frames)
    paths = []
    for frame, pair in zip(indices, images):
        for view, img in zip(VIEWS, pair):
            path = Path(out_dir) / f"{episode_id}_{frame:06d}_{view}.png"
            write_bytes(path, png_bytes(img))
            paths.append(path)
    return paths
