"""Shards stage end to end on hand-made inputs: token-by-token against SPEC.md rules, verify,
determinism, size bounds, too-long policy.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_shards.py -q
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.io import read_json
from pipeline.config import base
from pipeline.errors import DataError
from pipeline.io import write_json, write_npy, write_npz
from shards.verify import verify
from shards.bins import FieldStats, Stats
from stages.shards_stage import STAGE, build_shards
from fixtures_tokenizer import write_tokenizer

T, D, S, SIDE = 6, 7, 8, 2          # steps, action dims, state dims, codes per side (32 px)
TASKS = (("lift_cube", "lift the red cube"), ("open_drawer", "open the top drawer"))


# ---------------------------------------------------------------------------------------------
# Inputs: filter output, stats, frame-token store (hand-made, tiny).
# ---------------------------------------------------------------------------------------------

def field_stats(dim: int, lo: float, hi: float) -> FieldStats:
    z = np.zeros(dim)
    return FieldStats(min=np.full(dim, lo), max=np.full(dim, hi), p01=z, p99=z, mean=z, std=z,
                      count=1)


def episode_arrays(seed: int, steps: int = T) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"actions": rng.uniform(-1, 1, (steps, D)), "states": rng.uniform(-2, 2, (steps, S)),
            "obs_index": np.arange(steps), "action_index": np.arange(steps),
            "codes": rng.integers(0, 8192, (steps, 2, SIDE, SIDE)).astype(np.uint16)}


def make_inputs(root: Path, episodes_per_task: int = 2, steps: int = T) -> dict[str, Path]:
    dirs = {k: root / k for k in ("filter", "fit", "store")}
    rows, store_eps = [], []
    for t, (task, instruction) in enumerate(TASKS):
        for e in range(episodes_per_task):
            eid = f"{task}_demo__demo_{e}"
            arr = episode_arrays(10 * t + e, steps)
            write_npz(dirs["filter"] / "ep" / f"{eid}.npz",
                      **{k: arr[k] for k in ("actions", "states", "obs_index", "action_index")})
            write_npy(dirs["store"] / "codes" / f"{eid}.npy", arr["codes"])
            rows.append({"id": eid, "task": task, "instruction": instruction,
                         "n_kept": steps, "file": f"ep/{eid}.npz"})
            store_eps.append({"id": eid, "frames": steps, "file": f"codes/{eid}.npy"})
    write_json(dirs["filter"] / "episodes.json", {"schema": 1, "format": "libero",
                                                  "episodes": rows})
    stats = Stats(state=field_stats(S, -2, 2), action=field_stats(D, -1, 1))
    stats.save(dirs["fit"] / "stats.json")
    write_json(dirs["store"] / "store.json",
               {"schema": 1, "resolution": SIDE * 16, "grid": [SIDE, SIDE],
                "vq": {"digest": "abc", "untrained": True, "source": "random-small-seed0",
                       "arch": {}}, "episodes": store_eps})
    return dirs


def config(tokenizer: Path | None, **conv):
    cfg = base()
    conv = {"history": 2, "chunk": 2, "max_seq_len": 4096, **conv}
    return replace(cfg, recipe="test", conv=replace(cfg.conv, tokenizer_path=str(tokenizer)
                                                    if tokenizer else None, **conv),
                   split=replace(cfg.split, val_task_fraction=0.5, val_episode_fraction=0.5))


def build(dirs: dict[str, Path], cfg, out: Path) -> dict:
    return build_shards(cfg, dirs["filter"], dirs["fit"], dirs["store"], out)


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> tuple[Path, np.ndarray]:
    return write_tokenizer(tmp_path_factory.mktemp("tok") / "text_tokenizer.json", seed=3)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tok_path):
    root = tmp_path_factory.mktemp("shards")
    dirs = make_inputs(root)
    cfg = config(tok_path[0])
    return dirs, cfg, build(dirs, cfg, root / "out"), root / "out"


# ---------------------------------------------------------------------------------------------
# An independent reader and the hand-built expectation (SPEC.md 3-6, literal arithmetic).
# ---------------------------------------------------------------------------------------------

def read_all(path: Path) -> dict[str, dict[str, bytes]]:
    data = path.read_bytes()
    data = gzip.decompress(data) if path.name.endswith(".gz") else data
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar:
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def spec_bins(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    n = np.clip(2 * (x - lo) / (hi - lo + 1e-8) - 1, -1, 1)
    return np.digitize(n, np.linspace(-1, 1, 256))


def spec_image(codes: np.ndarray, code_to_id: np.ndarray) -> list[int]:
    out = [8197, 8804 + 32 // 32, 8804 + 32 // 32]
    for row in codes:
        out += [int(code_to_id[c]) for c in row] + [8803]
    return out + [8196]


def spec_action(a: np.ndarray) -> list[int]:
    return [10004] + [10005 + int(d) for d in spec_bins(a, -1, 1)] + [15004]


def spec_state(s: np.ndarray) -> list[int]:
    return [15504] + [15505 + int(d) for d in spec_bins(s, -2, 2)] + [16004]


def spec_sample(human: list[int], response: list[int]) -> tuple[list[int], list[int]]:
    tokens = [0] + human + [8710] + response + [8710]
    start = 1 + len(human) + 1
    return tokens, [-100] * start + tokens[start:]


def labels_of(tokens: np.ndarray, targets: list[list[int]]) -> list[int]:
    labels = [-100] * len(tokens)
    for s, e in targets:
        labels[s:e] = tokens[s:e].tolist()
    return labels


def stored(out: Path, kind: str, key: str) -> tuple[np.ndarray, dict, dict[str, bytes]]:
    for path in sorted(out.glob(f"{kind}-*.tar.gz")):
        samples = read_all(path)
        if key in samples:
            m = samples[key]
            return np.load(io.BytesIO(m["tokens.npy"])), json.loads(m["json"]), m
    raise KeyError(key)


# ---------------------------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("j", [0, 1])
def test_vla_sample_matches_hand_built(built, tok_path, j):
    dirs, cfg, manifest, out = built
    from shards.tokenizer import load_text_tokenizer
    text = load_text_tokenizer(tok_path[0]).encode(
        "What action should the robot take to lift the red cube?")
    arr = episode_arrays(0)
    frames = []
    for i in range(max(0, j - 1), j + 1):
        frames += spec_image(arr["codes"][i, 0], tok_path[1]) + spec_image(arr["codes"][i, 1],
                                                                           tok_path[1])
    human = text + spec_state(arr["states"][j]) + frames
    expected, labels = spec_sample(human, spec_action(arr["actions"][j])
                                   + spec_action(arr["actions"][j + 1]))
    tokens, meta, members = stored(out, "vla", f"lift_cube_demo__demo_0__{j:06d}")
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == expected
    assert labels_of(tokens, meta["targets"]) == labels
    assert (meta["kind"], meta["step"], meta["instruction"]) == ("vla", j, "lift the red cube")
    chunk = np.load(io.BytesIO(members["chunk.npy"]))
    assert chunk.dtype == np.float32 and chunk.shape == (2, D)
    np.testing.assert_allclose(chunk, arr["actions"][j:j + 2], atol=1e-6)  # range [-1, 1]


def test_wm_sample_matches_hand_built(built, tok_path):
    dirs, cfg, manifest, out = built
    from shards.tokenizer import load_text_tokenizer
    text = load_text_tokenizer(tok_path[0]).encode(
        "Generate the next image based on the provided sequence of historical images and "
        "corresponding actions.")
    arr, c = episode_arrays(0), tok_path[1]
    human = (text + spec_image(arr["codes"][1, 0], c) + spec_image(arr["codes"][1, 1], c)
             + spec_action(arr["actions"][1]))
    expected, labels = spec_sample(human, spec_image(arr["codes"][2, 0], c)
                                   + spec_image(arr["codes"][2, 1], c))
    tokens, meta, members = stored(out, "wm", "lift_cube_demo__demo_0__000001")
    assert tokens.tolist() == expected
    assert labels_of(tokens, meta["targets"]) == labels
    assert set(members) == {"tokens.npy", "json"}


def test_counts_splits_and_manifest(built):
    dirs, cfg, manifest, out = built
    assert manifest["totals"]["vla"]["samples"] == 4 * (T - 2 + 1)   # K=2: T-K+1 per episode
    assert manifest["totals"]["wm"]["samples"] == 4 * (T - 1)
    assert manifest["splits"]["val_tasks"] == ["open_drawer"]
    assert manifest["tokenizer"]["kind"] == "chameleon"
    assert manifest["vocab"]["tokens_per_image"] == 10 and manifest["vq"]["untrained"] is True
    # store.json's string-only VQ identity becomes the structured record (earlier fields kept)
    assert manifest["vq"] == {"kind": "random", "name": "small", "seed": 0, "digest": "abc",
                              "arch": {}, "untrained": True, "source": "random-small-seed0"}
    _, meta, _ = stored(out, "vla", "open_drawer_demo__demo_1__000000")
    assert meta["split"] == "val"
    assert (out / "stats.json").read_bytes() == (dirs["fit"] / "stats.json").read_bytes()


def test_verify_passes_then_fails_on_any_flipped_byte(built, tmp_path):
    dirs, cfg, manifest, out = built
    assert verify(out).problems == []
    for name in ("vla-000000.tar.gz", "wm-000000.tar.gz"):
        copy = tmp_path / name.split("-")[0]
        copy.mkdir()
        for p in out.iterdir():
            (copy / p.name).write_bytes(p.read_bytes())
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (copy / name).write_bytes(bytes(data))
        assert verify(copy).problems, name


def test_plain_tar_flipped_payload_byte_and_layout_check(tmp_path, tok_path):
    dirs = make_inputs(tmp_path, episodes_per_task=1)
    cfg = config(tok_path[0])
    cfg = replace(cfg, shard=replace(cfg.shard, compression="none"))
    out = tmp_path / "out"
    build(dirs, cfg, out)
    assert sorted(p.name for p in out.glob("*.tar")) == ["vla-000000.tar", "wm-000000.tar"]
    assert verify(out).problems == []
    data = bytearray((out / "vla-000000.tar").read_bytes())
    data[512 + 128] ^= 0x01              # the first token (BOS) of the first sample
    (out / "vla-000000.tar").write_bytes(bytes(data))
    problems = verify(out).problems
    assert any("sha256" in p for p in problems) and len(problems) >= 2  # hash + layout


def test_same_input_twice_is_byte_identical(tmp_path, tok_path):
    dirs = make_inputs(tmp_path, episodes_per_task=1)
    cfg = config(tok_path[0])
    a, b = tmp_path / "a", tmp_path / "b"
    build(dirs, cfg, a)
    build(dirs, cfg, b)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and "manifest.json" in files
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_size_bound_rolls_over_shards(tmp_path):
    dirs = make_inputs(tmp_path)
    cfg = config(None)
    cfg = replace(cfg, shard=replace(cfg.shard, max_shard_samples=3))
    manifest = build(dirs, cfg, tmp_path / "out")
    vla = [e for e in manifest["shards"] if e["kind"] == "vla"]
    assert [e["samples"] for e in vla] == [3, 3, 3, 3, 3, 3, 2]
    assert manifest["tokenizer"]["kind"] == "fallback"
    assert verify(tmp_path / "out").problems == []
    cfg = replace(cfg, shard=replace(cfg.shard, max_shard_samples=10**6, max_shard_bytes=65536))
    manifest = build(make_inputs(tmp_path / "long", steps=30), cfg, tmp_path / "small")
    assert all(e["tar_bytes"] <= 65536 for e in manifest["shards"])
    assert len(manifest["shards"]) > 2


def test_too_long_error_or_counted_drop(tmp_path):
    dirs = make_inputs(tmp_path, episodes_per_task=1)
    with pytest.raises(DataError, match=r"step 0 has \d+ tokens > conv.max_seq_len=100"):
        build(dirs, config(None, max_seq_len=100), tmp_path / "a")
    assert not list((tmp_path / "a").glob("*.tar.gz"))       # no half-written shard published
    # fallback text: 1 byte per id; j=0 has one frame (~107 tokens), j>0 two frames (~127)
    manifest = build(dirs, config(None, max_seq_len=110, world_model=False, too_long="drop"),
                     tmp_path / "b")
    assert manifest["drops"]["vla"] == {"too_long": 2 * (T - 2)}
    assert manifest["totals"]["vla"]["samples"] == 2 and "wm" not in manifest["totals"]


def test_stage_run_through_context(tmp_path):
    dirs = make_inputs(tmp_path, episodes_per_task=1)
    out = tmp_path / "stage"
    out.mkdir()
    ctx = STAGE.context(config(None), raw=None, out=out, quiet=True,
                  inputs={"filter": dirs["filter"], "fit-bins": dirs["fit"],
                          "pretokenize": dirs["store"]})
    result = STAGE.run(ctx)
    assert result.counts["vla_samples"] == result.counts["wm_samples"] == 2 * (T - 1)
    assert set(result.extra) == {"tokenizer", "vq"}  # the shard list lives in manifest.json
    assert len(read_json(out / "manifest.json")["shards"]) == 2
    assert STAGE.estimate(ctx) == {"episodes": 2, "vla_samples": 10, "wm_samples": 10}


def test_verify_catches_layout_and_target_errors(built):
    from shards.verify import Layout, token_problems
    dirs, cfg, manifest, out = built
    tokens, meta, _ = stored(out, "vla", "lift_cube_demo__demo_0__000001")
    lay = Layout.from_manifest(manifest)
    assert token_problems(tokens, meta, lay) == []
    shifted = {**meta, "targets": [[meta["targets"][0][0] - 1, len(tokens)]]}
    assert any("targets" in p for p in token_problems(tokens, shifted, lay))
    image_start = int(np.flatnonzero(tokens == 8197)[0])
    bad = tokens.copy()
    bad[image_start + 3] = 16500                 # a text id inside an image block
    assert any("image" in p for p in token_problems(bad, meta, lay))
    assert any("order" in p for p in token_problems(tokens, {**meta, "step": 0}, lay))


def test_inspect_renders_a_png(built, tmp_path):
    from shards.inspect import inspect
    dirs, cfg, manifest, out = built
    png = inspect(out, tmp_path / "wm.png", index=1, kind="wm")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
