"""Stage `shards`: VLA and world-model conversations -> deterministic webdataset shards + manifest.

Reads the `filter` episodes (actions, states, task, instruction), the `fit-bins` stats and the
`pretokenize` frame-token store; builds every sample in a fixed order (episodes in filter order,
then VLA steps, then world-model steps) holding one episode in memory at a time; writes
`vla-NNNNNN.tar.gz` / `wm-NNNNNN.tar.gz` (docs/ARCHITECTURE.md, "Shard sample format"), a copy of
the stats as `stats.json`, and the shard-set `manifest.json` (deterministic: no timestamps).
Changing conversation options (chunk, history, prompts, mix) reruns only this stage: 0 encodes.

    rynn-pipe tokenize --raw demos --recipe demo               # via the runner
    from stages.shards_stage import build_shards               # the library form
    manifest = build_shards(cfg, filter_dir, fit_dir, store_dir, out)
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.config import RunConfig, select
from pipeline.errors import DataError, StageError
from pipeline.io import load_npz, read_json, sha256_bytes, write_bytes, write_json
from pipeline.progress import Progress
from pipeline.runner import Context, Result, Stage, output_digest
from pipeline.splits import TRAIN, VAL, assign_splits
from shards.conversation import KINDS, VLA, WM, Codec, episode_samples, episode_tokens
from shards.format import MANIFEST, SCHEMA, STATS, manifest_digest, vocab_facts
from shards.tokenizer import TextTokenizer, load_text_tokenizer
from shards.writer import ShardSetWriter, totals
from stages.bins import Stats

FIELDS = ("conv.*", "split.*", "shard.*", "bins.num_bins", "recipe")
DEPS = ("filter", "fit-bins", "pretokenize")


# ---------------------------------------------------------------------------------------------
# Inputs.
# ---------------------------------------------------------------------------------------------

def check_stats(stats: Stats, cfg: RunConfig) -> None:
    if stats.num_bins != cfg.bins.num_bins:
        raise StageError(f"stats.json was fitted with num_bins={stats.num_bins} but "
                         f"bins.num_bins={cfg.bins.num_bins}; rerun fit-bins")
    if tuple(stats.relative_action_dims) != tuple(cfg.conv.relative_action_dims):
        raise StageError(f"stats.json has relative action dims {list(stats.relative_action_dims)}"
                         f" but conv.relative_action_dims={list(cfg.conv.relative_action_dims)}")


def load_episode(row: dict[str, Any], filter_dir: Path, store_dir: Path, store: dict[str, Any],
                 tokenizer: TextTokenizer, codec: Codec, stats: Stats):
    """The EpisodeTokens of one filter row (its arrays and codes checked against each other)."""
    data = load_npz(filter_dir / row["file"])
    codes_path = store_dir / "codes" / f"{row['id']}.npy"
    if not codes_path.exists():
        raise DataError("episode missing from the frame-token store; rerun pretokenize",
                        file=str(codes_path), episode=row["id"])
    codes = np.load(codes_path, allow_pickle=False)
    grid = tuple(store["grid"])
    if codes.shape[1:] != (2, *grid):
        raise DataError(f"codes shape {codes.shape} is not (T, 2, {grid[0]}, {grid[1]})",
                        file=str(codes_path), episode=row["id"])
    for key, fs in (("actions", stats.action), ("states", stats.state)):
        if data[key].shape[1] != fs.dim:
            raise DataError(f"{key} have {data[key].shape[1]} dims but stats.json has {fs.dim}",
                            file=str(filter_dir / row["file"]), episode=row["id"], key=key)
    return episode_tokens(row["id"], row["instruction"], codes, data["actions"], data["states"],
                          tokenizer, codec)


# ---------------------------------------------------------------------------------------------
# The manifest.
# ---------------------------------------------------------------------------------------------

def split_summary(rows: list[dict[str, Any]], split: dict[str, str]) -> dict[str, Any]:
    """Held-out (all-val) tasks, per-episode split and counts."""
    tasks: dict[str, set[str]] = {}
    for r in rows:
        tasks.setdefault(r["task"], set()).add(split[r["id"]])
    return {"val_tasks": sorted(t for t, s in tasks.items() if s == {VAL}),
            "episodes": {r["id"]: split[r["id"]] for r in rows},
            "counts": {s: sum(1 for r in rows if split[r["id"]] == s) for s in (TRAIN, VAL)}}


def drop_summary(drops: Counter) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {kind: {} for kind in KINDS}
    for (kind, reason), n in sorted(drops.items()):
        out[kind][reason] = n
    return out


def shard_manifest(cfg: RunConfig, entries: list[dict], stats_bytes: bytes, stats: Stats,
                   tokenizer: TextTokenizer, store: dict[str, Any], rows: list[dict],
                   split: dict[str, str], drops: Counter, dims: dict[str, int]) -> dict[str, Any]:
    vq = store.get("vq", {})
    return {
        "schema": SCHEMA, "format": "rynn-shards", "recipe": cfg.recipe,
        "config": select(cfg, FIELDS), "shards": entries, "totals": totals(entries),
        "stats": {"path": STATS, "sha256": sha256_bytes(stats_bytes), "source": stats.source},
        "tokenizer": tokenizer.describe(),
        "vq": {"digest": vq.get("digest"), "untrained": vq.get("untrained"),
               "source": vq.get("source"), "arch": vq.get("arch")},
        "vocab": vocab_facts(int(store["resolution"])),
        # how raw camera frames became these tokens: what inference must do to match training
        "images": {"orientation": store.get("orientation"), "views": store.get("views"),
                   "preprocessing": store.get("preprocessing"),
                   "resolution": int(store["resolution"])},
        "conv": {"history": cfg.conv.history, "chunk": cfg.conv.chunk, "num_bins": stats.num_bins,
                 "relative_action_dims": list(cfg.conv.relative_action_dims), **dims},
        "drops": drop_summary(drops), "splits": split_summary(rows, split)}


# ---------------------------------------------------------------------------------------------
# The build.
# ---------------------------------------------------------------------------------------------

def build_shards(cfg: RunConfig, filter_dir: Path, fit_dir: Path, store_dir: Path, out: Path, *,
                 progress: Callable[[int, str], Progress] | None = None) -> dict[str, Any]:
    """Write every shard, `stats.json` and `manifest.json` into `out`; return the manifest."""
    filter_dir, fit_dir, store_dir, out = map(Path, (filter_dir, fit_dir, store_dir, out))
    rows = read_json(filter_dir / "episodes.json")["episodes"]
    store = read_json(store_dir / "store.json")
    stats_bytes = (fit_dir / STATS).read_bytes()
    stats = Stats.load(fit_dir / STATS)
    check_stats(stats, cfg)
    tokenizer = load_text_tokenizer(cfg.conv.tokenizer_path)
    codec = Codec.from_stats(stats, cfg.bins.num_bins, tuple(cfg.conv.relative_action_dims))
    split = assign_splits([(r["task"], r["id"]) for r in rows], cfg.split.val_task_fraction,
                          cfg.split.val_episode_fraction, cfg.split.seed)
    drops: Counter = Counter()
    bar = (progress or (lambda n, d: Progress(n, d, disable=True)))(len(rows), "shards")
    with ShardSetWriter(out, cfg.shard) as writer, bar:
        for row in rows:
            ep = load_episode(row, filter_dir, store_dir, store, tokenizer, codec, stats)
            for sample in episode_samples(ep, codec, cfg.conv, drops):
                writer.add(sample, split[row["id"]], row["instruction"])
            bar.advance()
    check_nonempty(cfg, writer.entries, drops)
    write_bytes(out / STATS, stats_bytes)
    dims = {"action_dim": stats.action.dim, "state_dim": stats.state.dim}
    manifest = shard_manifest(cfg, writer.entries, stats_bytes, stats, tokenizer, store, rows,
                              split, drops, dims)
    manifest["digest"] = manifest_digest(manifest)
    write_json(out / MANIFEST, manifest)
    return manifest


def check_nonempty(cfg: RunConfig, entries: list[dict], drops: Counter) -> None:
    """An enabled query type that produced no sample is an error, not an empty stream."""
    made = {e["kind"] for e in entries}
    for kind, enabled in ((VLA, cfg.conv.vla), (WM, cfg.conv.world_model)):
        if enabled and kind not in made:
            why = {r: n for (k, r), n in drops.items() if k == kind}
            raise StageError(f"no {kind} samples were produced (dropped: {why or 'none'}); "
                             f"episodes may be shorter than conv.chunk={cfg.conv.chunk}")


# ---------------------------------------------------------------------------------------------
# The stage.
# ---------------------------------------------------------------------------------------------



def run(ctx: Context) -> Result:
    for debris in ctx.out.glob(".tmp-*"):  # a killed run's unfinished shard
        debris.unlink()
    manifest = build_shards(ctx.cfg, ctx.inputs["filter"], ctx.inputs["fit-bins"],
                            ctx.inputs["pretokenize"], ctx.out, progress=ctx.progress)
    if manifest["tokenizer"]["kind"] == "fallback":
        ctx.warn("shards: text tokens come from the built-in FALLBACK tokenizer")
    if manifest["vq"]["untrained"]:
        ctx.warn("shards: image tokens come from an UNTRAINED (random-init) VQ-GAN")
    t = manifest["totals"]
    counts = {"episodes": len(manifest["splits"]["episodes"]),
              **{f"{k}_samples": t.get(k, {}).get("samples", 0) for k in KINDS},
              **{f"{k}_tokens": t.get(k, {}).get("tokens", 0) for k in KINDS},
              "dropped": {f"{k}:{r}": n for k, d in manifest["drops"].items()
                          for r, n in d.items()}}
    # The shard set's own manifest.json (deterministic) is an output; the runner's stage.json
    # records the rest, so only pointers go there.
    extra = {"tokenizer": manifest["tokenizer"], "vq": manifest["vq"]}
    return Result(counts=counts, extra=extra)


def estimate(ctx: Context) -> dict[str, int]:
    rows = read_json(ctx.inputs["filter"] / "episodes.json")["episodes"]
    k = ctx.cfg.conv.chunk
    vla = sum(max(0, int(r["n_kept"]) - k + 1) for r in rows) if ctx.cfg.conv.vla else 0
    wm = sum(max(0, int(r["n_kept"]) - 1) for r in rows) if ctx.cfg.conv.world_model else 0
    return {"episodes": len(rows), "vla_samples": vla, "wm_samples": wm}


def input_digest(ctx: Context) -> dict[str, str]:
    """Upstream outputs plus the text tokenizer file's content (its path alone is in the key)."""
    out = {dep: output_digest(ctx.inputs[dep]) for dep in DEPS}
    path = ctx.cfg.conv.tokenizer_path
    if path is not None:
        from pipeline.io import sha256_file
        out["tokenizer"] = sha256_file(path) if Path(path).is_file() else "missing"
    return out


STAGE = Stage(name="shards", version="3", fields=FIELDS, deps=DEPS, run=run, estimate=estimate,
              input_digest=input_digest)
