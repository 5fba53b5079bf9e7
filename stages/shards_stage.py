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
from pipeline.io import load_npz, read_json, sha256_bytes, sha256_file, write_bytes, write_json
from pipeline.progress import Progress
from pipeline.runner import Context, Result, Stage, output_digest
from pipeline.actions import relative_dtype
from pipeline.splits import TRAIN, VAL, coarse, episode_splits
from shards.conversation import (DEFAULT_RULES, KINDS, VLA, WM, Codec, Rules, episode_samples,
                                 episode_tokens)
from shards.format import MANIFEST, SCHEMA, STATS, manifest_digest, vocab_facts
from shards.records import VQRecord
from shards.tokenizer import TextTokenizer, load_text_tokenizer
from shards.writer import ShardSetWriter, totals
from shards.bins import Stats
from stages.encode import wm_codes_file

FIELDS = ("conv.*", "split.*", "shard.*", "bins.num_bins", "recipe", "compat")
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
                 tokenizer: TextTokenizer, codec: Codec, stats: Stats,
                 instruction: str | None = None):
    """The EpisodeTokens of one filter row (its arrays and codes checked against each other)."""
    instruction = row["instruction"] if instruction is None else instruction
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
    return episode_tokens(row["id"], instruction, codes, data["actions"], data["states"],
                          tokenizer, codec, wm_codes(row, store_dir, store, len(codes)))


def wm_codes(row: dict[str, Any], store_dir: Path, store: dict[str, Any], n: int
             ) -> np.ndarray | None:
    """The episode's world-model codes when the store holds a separate set (published fitting)."""
    entry = store.get("wm_grids", {}).get(row["id"])
    if entry is None:
        return None
    path = store_dir / wm_codes_file(row["id"])
    if not path.exists():
        raise DataError("world-model codes missing from the frame-token store; rerun pretokenize",
                        file=str(path), episode=row["id"])
    codes = np.load(path, allow_pickle=False)
    if codes.shape != (n, 2, *entry):
        raise DataError(f"world-model codes shape {codes.shape} is not ({n}, 2, {entry[0]}, "
                        f"{entry[1]})", file=str(path), episode=row["id"])
    return codes


def prompt_instruction(row: dict[str, Any], cfg: RunConfig, fmt: str) -> str:
    """The instruction the VLA prompt names: the episode's, or with compat=published on LIBERO
    the task name from the file name WITH its scene prefix, `_` -> space (the published prompt)."""
    if cfg.compat == "published" and fmt == "libero":
        return row["task"].replace("_", " ").strip()
    return row["instruction"]


def sample_rules(cfg: RunConfig, fmt: str) -> Rules:
    if cfg.compat != "published":
        return DEFAULT_RULES
    return Rules(published_static=True, per_camera_wm=fmt == "lerobot")


# ---------------------------------------------------------------------------------------------
# The manifest.
# ---------------------------------------------------------------------------------------------

def split_summary(rows: list[dict[str, Any]], fine: dict[str, str], cfg: RunConfig
                  ) -> dict[str, Any]:
    """Held-out (all-val) tasks, per-episode split and counts; with compat=published also the
    published split of each episode and the published training set (all three splits)."""
    split = {k: coarse(v) for k, v in fine.items()}
    tasks: dict[str, set[str]] = {}
    for r in rows:
        tasks.setdefault(r["task"], set()).add(split[r["id"]])
    out = {"val_tasks": sorted(t for t, s in tasks.items() if s == {VAL}),
           "episodes": {r["id"]: split[r["id"]] for r in rows},
           "counts": {s: sum(1 for r in rows if split[r["id"]] == s) for s in (TRAIN, VAL)}}
    if cfg.compat == "published":
        out.update(rule="published", training_split="all",
                   published={r["id"]: fine[r["id"]] for r in rows})
    return out


def drop_summary(drops: Counter) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {kind: {} for kind in KINDS}
    for (kind, reason), n in sorted(drops.items()):
        out[kind][reason] = n
    return out


def shard_manifest(cfg: RunConfig, entries: list[dict], stats_bytes: bytes, stats: Stats,
                   tokenizer: TextTokenizer, store: dict[str, Any], rows: list[dict],
                   split: dict[str, str], drops: Counter, dims: dict[str, int]) -> dict[str, Any]:
    per_camera = dims.pop("per_camera_wm", False)
    out = {
        "schema": SCHEMA, "format": "rynn-shards", "recipe": cfg.recipe,
        "config": select(cfg, FIELDS), "shards": entries, "totals": totals(entries),
        "stats": {"path": STATS, "sha256": sha256_bytes(stats_bytes), "source": stats.source},
        "tokenizer": tokenizer.record.to_json(),
        # store.json keeps its earlier string form (its bytes are the codes store's identity)
        "vq": VQRecord.from_json(store["vq"]).to_json(),
        "vocab": vocab_facts(int(store["resolution"])),
        # how raw camera frames became these tokens: what inference must do to match training
        "images": {"orientation": store.get("orientation"), "views": store.get("views"),
                   "preprocessing": store.get("preprocessing"),
                   "resolution": int(store["resolution"])},
        "conv": {"history": cfg.conv.history, "chunk": cfg.conv.chunk, "num_bins": stats.num_bins,
                 "relative_action_dims": list(cfg.conv.relative_action_dims), **dims},
        "drops": drop_summary(drops), "splits": split_summary(rows, split, cfg)}
    if cfg.compat != "published" and any(hw and hw[0] != hw[1]
                                         for hw in (r.get("image_hw") for r in rows)):
        out["images"]["fit"] = "stretch"     # source.non_square=stretch let them through
    if cfg.compat == "published":     # only then: the default manifest keeps its bytes
        grids = sorted({tuple(g) for g in store.get("wm_grids", {}).values()})
        out["images"].update(fit="published", crop_seed=store.get("crop_seed"), wm_grids=grids)
        out["conv"]["wm_views"] = "per_camera" if per_camera else "both"
        out["compat"] = "published"
    return out


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
    codec = Codec.from_stats(stats, cfg.bins.num_bins, tuple(cfg.conv.relative_action_dims),
                             relative_dtype(cfg))
    fmt = read_json(filter_dir / "episodes.json").get("format", "unknown")
    split = episode_splits(rows, cfg, fmt)
    rules = sample_rules(cfg, fmt)
    drops: Counter = Counter()
    bar = (progress or (lambda n, d: Progress(n, d, disable=True)))(len(rows), "shards")
    with ShardSetWriter(out, cfg.shard) as writer, bar:
        for row in rows:
            prompt = prompt_instruction(row, cfg, fmt)
            ep = load_episode(row, filter_dir, store_dir, store, tokenizer, codec, stats, prompt)
            for sample in episode_samples(ep, codec, cfg.conv, drops, rules):
                writer.add(sample, coarse(split[row["id"]]), prompt)
            bar.advance()
    check_nonempty(cfg, writer.entries, drops)
    write_bytes(out / STATS, stats_bytes)
    dims = {"action_dim": stats.action.dim, "state_dim": stats.state.dim,
            "per_camera_wm": rules.per_camera_wm}
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
        out["tokenizer"] = sha256_file(path) if Path(path).is_file() else "missing"
    return out


STAGE = Stage(name="shards", version="3", fields=FIELDS, deps=DEPS, run=run, estimate=estimate,
              input_digest=input_digest)
