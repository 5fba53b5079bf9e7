"""Render one shard sample to a PNG a person can read: decoded images of every view, the
instruction, the state and the action chunk as plots, and the token sequence as coloured segments.

Images are decoded with the VQ-GAN decoder (`shards.vq_decoder`): the weights at `vq_path`, or,
when none are given and the shards were made with a seeded random VQ-GAN, that same random model
(the figure then says the pictures come from an UNTRAINED decoder). Without a usable decoder the
code grids are drawn as colour maps instead.

    from shards.inspect import inspect
    inspect("out/demo/shards", "sample.png", index=0, kind="vla")
    rynn-pipe inspect out/demo/shards --out sample.png --kind wm --index 3
    rynn-pipe inspect https://host/demo/shards --out sample.png   # a URL (shards/remote.py)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError, RynnError
from shards import vocab
from shards.bins import from_bins
from shards.conversation import parse_image_block, split_blocks
from shards.format import iter_samples, parse_members
from shards.records import TokenizerRecord, VQRecord
from shards.shard_set import ShardSet
from shards.tokenizer import TextTokenizer, TokenizerMismatch, load_tokenizer_from_record
from shards.verify import Layout
from shards.vq import load_vq_from_record
from shards.vq_decoder import DecoderError, decode

COLOURS = {"bos": "#444444", "text": "#4e79a7", "state": "#59a14f", "image": "#f28e2b",
           "action": "#e15759", "sep": "#111111"}


# ---------------------------------------------------------------------------------------------
# Reading one sample.
# ---------------------------------------------------------------------------------------------

def find_sample(shards: ShardSet, kind: str, index: int) -> dict[str, Any]:
    """Sample `index` (0-based, stored order) among the samples of `kind` (of a URL shard set,
    the one shard needed is fetched and checked)."""
    entries = shards.entries(kind)
    total = sum(e["samples"] for e in entries)
    if not 0 <= index < total:
        raise RynnError(f"--index {index}: the shard set has {total} {kind} samples")
    for e in entries:
        if index < e["samples"]:
            for i, (key, members) in enumerate(iter_samples(shards.tar(e), file=e["path"])):
                if i == index:
                    return parse_members(key, members, file=e["path"])
        index -= e["samples"]
    raise DataError("sample count differs from the manifest; run `rynn-pipe verify`",
                    file=str(shards.root))


def manifest_tokenizer(manifest: dict[str, Any]) -> TextTokenizer | None:
    """The tokenizer the shards were made with, or None when its file is not available."""
    try:
        return load_tokenizer_from_record(TokenizerRecord.from_json(manifest["tokenizer"]))
    except TokenizerMismatch:
        return None


def load_decoder(manifest: dict[str, Any], vq_path: str | None) -> tuple[Any, str]:
    """(VQ handle or None, a note for the figure)."""
    record = VQRecord.from_json(manifest["vq"])
    if vq_path is None and not record.untrained:
        return None, "no VQ weights given (--vq-path): code grids shown as colour maps"
    handle = load_vq_from_record(record, vq_path, device="cpu", check=False)
    note = (f"decoded with {vq_path}" if vq_path is not None else
            "images decoded by a RANDOM-INIT (untrained) VQ-GAN decoder: pixels mean nothing")
    if handle.digest != record.digest:
        note += " (WARNING: VQ digest differs from the one the shards were made with)"
    return handle, note


def image_codes(tokens: np.ndarray, segs: list, tok: TextTokenizer | None
                ) -> list[np.ndarray]:
    """Codebook grids (rows, cols) of every image block, the shape read from its grid tokens
    (non-square under the published fitting); token ids when the map is unknown."""
    id_to_code = tok.id_to_image_code if tok is not None else None
    return [parse_image_block(tokens[s:e], id_to_code) for kind, s, e in segs if kind == "image"]


def decode_images(grids: list[np.ndarray], handle, mapped: bool) -> list[np.ndarray] | None:
    if handle is None or not mapped or not grids:
        return None
    try:
        if len({g.shape for g in grids}) == 1:
            return list(decode(handle, np.stack(grids)))
        return [decode(handle, g[None])[0] for g in grids]
    except DecoderError:
        return None


# ---------------------------------------------------------------------------------------------
# Drawing.
# ---------------------------------------------------------------------------------------------

def image_labels(meta: dict[str, Any], n: int) -> list[str]:
    j = int(meta["step"])
    if meta["kind"] == "vla":
        first = j - n // 2 + 1
        return [f"{v} t={t}" for t in range(first, j + 1) for v in ("front", "wrist")]
    if n == 2:       # compat=published SO100: one camera, step = 2 * valid frame + view
        view = ("front", "wrist")[j % 2]
        return [f"{view} (valid frame {j // 2})", f"next {view} (valid frame {j // 2 + 1})"]
    return [f"front t={j}", f"wrist t={j}", f"next front t={j + 1}", f"next wrist t={j + 1}"]


def bins_of(tokens: np.ndarray, segs: list, kind: str, num_bins: int) -> np.ndarray:
    """Bin centres (blocks, dims) of every "state" or "action" block."""
    parse = vocab.parse_state_block if kind == "state" else vocab.parse_action_block
    rows = [parse(tokens[s:e]) for k, s, e in segs if k == kind]
    return from_bins(np.stack(rows), num_bins) if rows else np.zeros((0, 0))


def draw_segments(ax, segs: list, length: int, targets: list) -> None:
    ax.barh(0, 1, left=0, color=COLOURS["bos"], height=0.6)
    for kind, s, e in segs:
        ax.barh(0, e - s, left=s, color=COLOURS[kind], height=0.6, edgecolor="white", lw=0.6)
    for s, e in targets:
        ax.barh(0.55, e - s, left=s, color="black", height=0.12)
    ax.set_xlim(0, length)
    ax.set_yticks([])
    ax.set_xlabel("token position (black line: training targets)")
    handles = [ax.bar(0, 0, color=c, label=k) for k, c in COLOURS.items()]
    ax.legend(handles=handles, ncol=len(COLOURS), loc="upper center", bbox_to_anchor=(0.5, -1.3),
              fontsize=8, frameon=False)


def draw(sample: dict[str, Any], pictures: list[np.ndarray], note: str, state: np.ndarray,
         actions: np.ndarray, segs: list, out_png: Path) -> None:
    import matplotlib               # heavy, and only this command draws: imported when drawing
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib: slow to import, only drawing needs it
    meta, tokens = sample["meta"], sample["tokens"]
    n = max(len(pictures), 2)
    fig = plt.figure(figsize=(max(10, 2.6 * n), 8))
    grid = fig.add_gridspec(3, n, height_ratios=[3, 2.2, 0.5], hspace=0.45)
    for i, (pic, label) in enumerate(zip(pictures, image_labels(meta, len(pictures)))):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(pic, cmap=None if pic.ndim == 3 else "viridis")
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    plot_vectors(fig.add_subplot(grid[1, : n // 2]), state, "state (normalized, bin centres)"
                 if state.size else "state (not part of world-model samples)")
    title = "action chunk (normalized)" if meta["kind"] == "vla" else "action a_t (bin centres)"
    plot_vectors(fig.add_subplot(grid[1, n // 2:]), actions, title)
    draw_segments(fig.add_subplot(grid[2, :]), segs, len(tokens), meta["targets"])
    fig.suptitle(f"{meta['kind'].upper()} {sample['key']}  [{meta['split']}]  "
                 f"{len(tokens)} tokens\n\"{meta['instruction']}\"\n{note}", fontsize=10)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90, bbox_inches="tight")
    plt.close(fig)


def plot_vectors(ax, values: np.ndarray, title: str) -> None:
    """One line per row (step) over the dimensions; a single row as bars."""
    ax.set_title(title, fontsize=9)
    ax.set_ylim(-1.05, 1.05)
    ax.axhline(0, color="#bbbbbb", lw=0.8)
    if values.size == 0:
        ax.text(0.5, 0.5, "none", ha="center", transform=ax.transAxes)
    elif len(values) == 1:
        ax.bar(np.arange(values.shape[1]), values[0], color="#59a14f")
    else:
        for k, row in enumerate(values):
            ax.plot(np.arange(len(row)), row, marker="o", ms=3, label=f"t+{k}",
                    color=(k / max(1, len(values) - 1), 0.3, 0.6))
        ax.legend(fontsize=6, ncol=2)
    ax.set_xlabel("dimension", fontsize=8)


# ---------------------------------------------------------------------------------------------
# The command.
# ---------------------------------------------------------------------------------------------

def inspect(directory: str | Path, out_png: str | Path, *, index: int = 0, kind: str = "vla",
            vq_path: str | None = None) -> Path:
    """Render sample `index` of `kind` ("vla" or "wm") of a shard set to `out_png`."""
    if kind not in ("vla", "wm"):
        raise RynnError(f"--kind {kind!r}: choose vla or wm")
    shards, out_png = ShardSet.open(directory), Path(out_png)
    root, manifest = shards.root, shards.manifest
    lay = Layout.from_manifest(manifest)
    sample = find_sample(shards, kind, index)
    tokens = sample["tokens"].astype(np.int64)
    segs, problems = split_blocks(tokens, action_dim=lay.action_dim, state_dim=lay.state_dim)
    if problems:
        raise DataError(f"sample {sample['key']} does not parse: {problems[0]}", file=str(root))
    tok = manifest_tokenizer(manifest)
    grids = image_codes(tokens, segs, tok)
    handle, note = load_decoder(manifest, vq_path)
    pictures = decode_images(grids, handle, tok is not None)
    if pictures is None:
        pictures, note = grids, note + "; images drawn as code maps (no decoder or code map)"
    state = bins_of(tokens, segs, "state", lay.num_bins)
    actions = sample["chunk"] if sample["chunk"] is not None else bins_of(
        tokens, segs, "action", lay.num_bins)
    draw(sample, pictures, note, state, np.asarray(actions), segs, out_png)
    return out_png

