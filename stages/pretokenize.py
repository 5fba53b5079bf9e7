"""Stage `pretokenize`: encode every kept (episode, frame, view) with the VQ-GAN exactly once.

Output (docs/ARCHITECTURE.md): `codes/<episode_id>.npy` uint16 (n_kept, 2, h, w), views
("front", "wrist"), frame i = raw observation row `obs_index[i]` of the filter output; and
`store.json` (VQ digest, untrained flag, architecture, resolution, orientation, preprocessing,
encodes, unique pairs, per-episode frame counts). Conversations and shards are built from this
store, so changing history, chunk size, prompts or the VLA/world-model mix never re-encodes.

The encoding itself (loader and encoder threads, `image.workers` processes, devices, batch size)
is stages/encode.py. Under torchrun (`RANK`/`WORLD_SIZE`, pipeline/group.py) the ranks split the
episodes, across machines sharing the cache's file system, and rank 0 writes `store.json`, the
only shared output, last. Episodes whose codes file already exists in `ctx.out` (a crashed run)
are skipped, so a rerun encodes only unfinished episodes.

With compat=published every frame is fitted as the published processors do (`shards.fit`):
`codes/` holds the VLA fitting (square), and `codes_wm/<episode_id>.npy` the world-model fitting
(aspect kept, e.g. (n_kept, 2, 14, 18) for 640 x 480 at 256) for episodes whose frames are not
256 x 256 (for those the two fittings are the same pixels, encoded once); `store.json` then adds
`fit` and `wm_grids` {episode: [rows, cols]}.

    rynn-pipe tokenize --raw demos --until pretokenize          # via the runner
    rynn-pipe decode <store> <episode>                          # codes back to PNG (stages/encode.py)
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ConfigView, digest
from pipeline.episode import VIEWS, EpisodeRef
from pipeline.errors import DataError
from pipeline.io import load_npz, read_json, write_json
from pipeline.runner import Context, Result, Stage, raw_fingerprint
from shards.fit import PUBLISHED_PREPROCESSING, shares_fit, wm_grid
from shards.vq import PREPROCESSING, VQHandle
from stages import encode
from stages.encode import CODES_DIR, STORE, WM_CODES_DIR, Job, codes_file, grid_side

SCHEMA = 1
# Reader entry point "module:function" (root, ref, SourceConfig) -> Episode; tests and the bench
# point it at synthetic episodes (it must be importable in spawned worker processes).
LOADER = "stages.source:load"


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
    if cfg.compat != "published":
        return jobs
    rows = read_json(filter_dir / "episodes.json")["episodes"]
    sizes = {r["id"]: tuple(r["image_hw"]) for r in rows}
    wm = [replace(j, fit="wm", grid=wm_grid(*sizes[j.id], cfg.image.resolution))
          for j in jobs if not shares_fit(*sizes[j.id])]
    return [replace(j, fit="vla") for j in jobs] + wm


def input_digest(ctx: Context) -> dict[str, str]:
    """Only which frames exist (episode ids + obs rows), the raw files and the VQ weights."""
    jobs = read_jobs(ctx.inputs["filter"])
    frames = digest([[j.id, j.rows.tolist()] for j in jobs])
    return {"frames": frames, "raw": raw_fingerprint(ctx.raw),
            "vq": encode.vq_handle(ctx.cfg.image).digest}


def estimate(ctx: Context) -> dict[str, int]:
    rows = read_json(ctx.inputs["filter"] / "episodes.json")["episodes"]
    frames = sum(int(r["n_kept"]) for r in rows)
    jobs = compat_jobs([Job(r["id"], None, np.zeros(int(r["n_kept"]), np.int64)) for r in rows],
                       ctx.inputs["filter"], ctx.cfg)
    return {"episodes": len(rows), "frames": frames, "images": sum(j.images for j in jobs)}


def is_done(out: Path, job: Job, side: int) -> bool:
    """True when a complete codes file for the job is already in `out` (written atomically)."""
    path = out / job.file
    if not path.exists():
        return False
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    return arr.dtype == np.uint16 and arr.shape == (len(job.rows), len(VIEWS), *(job.grid or
                                                                               (side, side)))


def store_doc(cfg: ConfigView, handle: VQHandle, jobs: list[Job], fmt: str) -> dict[str, Any]:
    """store.json: identical for any worker count or interruption (no timings, no paths)."""
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
        doc.update(fit="published", preprocessing=PUBLISHED_PREPROCESSING,
                   crop_seed=cfg.image.crop_seed,
                   wm_grids={j.id: list(j.grid) for j in jobs if j.fit == "wm"})
    return doc


def run(ctx: Context) -> Result:
    """Encode the episodes not yet in `ctx.out`. Under torchrun every rank runs this on its
    share of the episodes (`jobs[rank::world]`, fixed whatever is already done) and rank 0,
    once all ranks are through, checks every episode is there and writes `store.json`."""
    group = ctx.group
    jobs = compat_jobs(read_jobs(ctx.inputs["filter"]), ctx.inputs["filter"], ctx.cfg)
    cfg, handle = encode.for_rank(ctx.cfg, group)
    side = grid_side(cfg.image.resolution, handle)
    if group.leader:
        for folder in (CODES_DIR, WM_CODES_DIR):      # a killed run's unfinished writes
            for debris in (ctx.out / folder).glob(".tmp-*"):
                debris.unlink()
    group.barrier()                                   # no rank writes before the debris is gone
    mine = encode.rank_share(jobs, group)
    todo = [j for j in mine if not is_done(ctx.out, j, side)]
    if handle.untrained:
        ctx.warn("pretokenize: tokens come from an UNTRAINED (random-init) VQ-GAN")
    share = "" if group.world == 1 else f" (rank 0 of {group.world}; each rank its share)"
    ctx.log(f"pretokenize: {len(jobs)} episodes, {len(mine) - len(todo)} already encoded "
            f"(resumed), {sum(j.images for j in todo)} images to encode on {handle.device}{share}")
    timing = encode.encode_all(ctx, handle, encode.Plan(cfg, ctx.raw, ctx.out, todo, LOADER))
    totals = group.all_sum([timing.encodes, timing.encode_s, timing.wait_s, len(mine) - len(todo)])
    if not group.leader:
        return Result(counts={"encodes": int(totals[0])})
    return publish(ctx, handle, jobs, side, encode.Timing(int(totals[0]), *totals[1:3]),
                   int(totals[3]))


def publish(ctx: Context, handle: VQHandle, jobs: list[Job], side: int, timing: encode.Timing,
            resumed: int) -> Result:
    """Rank 0, all ranks through: check every episode is there, write `store.json`."""
    missing = [j.id for j in jobs if not is_done(ctx.out, j, side)]
    if missing:
        raise DataError(f"{len(missing)} episodes have no complete codes file after every rank "
                        f"finished, e.g. {missing[:3]}", file=str(ctx.out / CODES_DIR))
    fmt = read_json(ctx.inputs["filter"] / "episodes.json").get("format", "unknown")
    store = store_doc(ctx.cfg, handle, jobs, fmt)
    write_json(ctx.out / STORE, store)
    ctx.log(f"pretokenize: encodes {timing.encodes}, unique (frame, view) pairs "
            f"{store['unique_pairs']}, encoder waited {timing.wait_s:.1f} s of "
            f"{timing.wait_s + timing.encode_s:.1f} s")
    counts = {"episodes": len(store["episodes"]), "frames": store["frames"],
              "unique_pairs": store["unique_pairs"], "encodes": timing.encodes,
              "resumed_episodes": resumed}
    extra = {"untrained_tokenizer": handle.untrained, "vq_digest": handle.digest,
             "encoder": {"encode_s": round(timing.encode_s, 3), "wait_s": round(timing.wait_s, 3)},
             "ranks": ctx.group.world}
    return Result(counts=counts, extra=extra)


STAGE = Stage(name="pretokenize", version="1",
              fields=("image.resolution", "image.vq_path", "image.vq_random_arch", "image.vq_seed",
                      "image.precision", "source.*", "compat", "image.crop_seed"),
              deps=("filter", "raw"), run=run, estimate=estimate, input_digest=input_digest,
              distributed=True, untracked=("image.workers", "image.device", "image.batch_size"))
