"""Stage `pretokenize` on synthetic episodes: layout, orientation, workers, resume, cache, decode.

A fake filter output and a fake reader (`fake_load`, importable by spawned workers) stand in for
the LIBERO reader; the VQ-GAN is the small random arch at 64 px (4x4 code grids).

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_pretokenize.py -q
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import base
from pipeline.episode import VIEWS, Episode, EpisodeRef
from pipeline.errors import DataError
from pipeline.io import read_json, write_json, write_npz
from pipeline.runner import Context, Result, Runner, Stage
from shards import vq
from stages import encode, pretokenize, vq_batch

RAW_HW = 40  # != resolution: exercises the resize
EPISODES = {"demo_0": (7, [0, 1, 2, 4, 5]), "demo_1": (5, [1, 2, 3, 4]), "demo_2": (4, [0, 3])}


def raw_frame(key: str, view: str, row: int) -> np.ndarray:
    """As recorded (upside down); deterministic per (episode, view, row)."""
    seed = [int(key.rsplit("_", 1)[1]), VIEWS.index(view), int(row)]
    return np.random.default_rng(seed).integers(0, 256, (RAW_HW, RAW_HW, 3), dtype=np.uint8)


def fake_load(root, ref: EpisodeRef, source_cfg) -> Episode:
    """The reader contract: frames in training orientation, rotated once when rotate_180."""
    def load_frames(view, rows):
        frames = np.stack([raw_frame(ref.key, view, r) for r in rows])
        return frames[:, ::-1, ::-1] if source_cfg.rotate_180 else frames
    n = ref.length
    return Episode(ref=ref, instruction="pick", actions=np.zeros((n, 7)), states=np.zeros((n, 8)),
                   obs_after_action=False, load_frames=load_frames, image_size=(RAW_HW, RAW_HW))


def write_filter(root: Path, episodes=EPISODES) -> Path:
    rows = []
    for key, (n_raw, kept) in episodes.items():
        ref = EpisodeRef(source="task_demo.hdf5", key=key, task="task", length=n_raw)
        rows.append({"id": ref.episode_id, "source": ref.source, "key": key, "task": "task",
                     "n_raw": n_raw, "n_kept": len(kept), "file": f"ep/{ref.episode_id}.npz"})
        write_npz(root / rows[-1]["file"], obs_index=np.array(kept, np.int64),
                  actions=np.zeros((len(kept), 7)))
    write_json(root / "episodes.json", {"schema": 1, "format": "libero", "episodes": rows})
    return root


@pytest.fixture(autouse=True)
def synthetic_reader(monkeypatch):
    monkeypatch.setattr(pretokenize, "LOADER", f"{__name__}:fake_load")


@pytest.fixture
def cfg():
    c = base()
    return replace(c, image=replace(c.image, resolution=64, vq_random_arch="small", batch_size=4,
                                    device="cpu"))


@pytest.fixture
def world(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "task_demo.hdf5").write_bytes(b"x")
    return tmp_path, write_filter(tmp_path / "filter")


def make_ctx(cfg, world, out="out") -> Context:
    root, filt = world
    (root / out).mkdir(exist_ok=True)
    return pretokenize.STAGE.context(cfg, raw=root / "raw", inputs={"filter": filt}, out=root / out, quiet=True)


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def small_handle():
    return vq.load_vq(None, random_arch="small", seed=0, device="cpu")


def test_layout_store_and_counts(cfg, world):
    ctx = make_ctx(cfg, world)
    result = pretokenize.run(ctx)
    pairs = 2 * sum(len(k) for _, k in EPISODES.values())
    assert result.counts["encodes"] == result.counts["unique_pairs"] == pairs
    store = read_json(ctx.out / "store.json")
    assert store["unique_pairs"] == store["encodes"] == pairs and store["grid"] == [4, 4]
    assert store["vq"]["untrained"] and store["orientation"] == "rot180"
    assert [e["frames"] for e in store["episodes"]] == [len(k) for _, k in EPISODES.values()]
    codes = np.load(ctx.out / "codes/task_demo__demo_0.npy")
    assert codes.dtype == np.uint16 and codes.shape == (5, 2, 4, 4)
    assert pretokenize.estimate(ctx) == {"episodes": 3, "frames": 11, "images": 22}


@pytest.mark.parametrize("rotate", [True, False])
def test_orientation_applied_exactly_once(cfg, world, rotate):
    cfg = replace(cfg, source=replace(cfg.source, rotate_180=rotate))
    ctx = make_ctx(cfg, world)
    pretokenize.run(ctx)
    handle = small_handle()
    rows = EPISODES["demo_1"][1]
    ep = fake_load(None, EpisodeRef("task_demo.hdf5", "demo_1", "task", 5), cfg.source)
    front = vq.encode(handle, vq.preprocess(ep.load_frames("front", rows), 64)).numpy()
    upright = np.stack([raw_frame("demo_1", "front", r) for r in rows])
    raw_codes = vq.encode(handle, vq.preprocess(upright, 64)).numpy()
    stored = np.load(ctx.out / "codes/task_demo__demo_1.npy")[:, 0]
    assert np.array_equal(stored, front)
    assert np.array_equal(stored, raw_codes) != rotate
    assert read_json(ctx.out / "store.json")["orientation"] == ("rot180" if rotate else "none")


def test_workers_give_byte_identical_stores(cfg, world):
    one = make_ctx(cfg, world, "one")
    two = make_ctx(replace(cfg, image=replace(cfg.image, workers=2)), world, "two")
    pretokenize.run(one)
    assert pretokenize.run(two).counts["encodes"] == 22
    assert tree_bytes(one.out) == tree_bytes(two.out)


def test_resume_after_interruption(cfg, world, monkeypatch):
    full = make_ctx(cfg, world, "full")
    pretokenize.run(full)
    real_encode, calls = vq.encode, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # demo_0 (10 images = 3 batches of 4) is done, demo_1 is not
            raise RuntimeError("killed")
        return real_encode(*args, **kwargs)

    ctx = make_ctx(cfg, world, "resumed")
    monkeypatch.setattr(vq, "encode", failing)
    with pytest.raises(RuntimeError, match="killed"):
        pretokenize.run(ctx)
    assert sorted(p.name for p in (ctx.out / "codes").iterdir()) == ["task_demo__demo_0.npy"]
    (ctx.out / "codes/.tmp-task_demo__demo_1.npy.x").write_bytes(b"half")  # killed mid-write
    monkeypatch.setattr(vq, "encode", real_encode)
    result = pretokenize.run(ctx)
    assert result.counts["encodes"] == 2 * (4 + 2) and result.counts["resumed_episodes"] == 1
    assert tree_bytes(ctx.out) == tree_bytes(full.out)


def test_vq_gan_is_loaded_once_for_digest_and_run(cfg, world, monkeypatch):
    real_load, calls = vq.load_vq, []
    monkeypatch.setattr(encode, "_LOADED", {})
    monkeypatch.setattr(vq, "load_vq", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    ctx = make_ctx(cfg, world)
    digest = pretokenize.input_digest(ctx)["vq"]
    assert pretokenize.run(ctx).extra["vq_digest"] == digest and len(calls) == 1
    pretokenize.input_digest(make_ctx(replace(cfg, image=replace(cfg.image, vq_seed=1)), world))
    assert len(calls) == 2 and len(encode._LOADED) == 1     # other weights replace the first


def test_input_digest_tracks_frames_only(cfg, world):
    root, filt = world
    ctx = make_ctx(cfg, world)
    first = pretokenize.input_digest(ctx)
    write_npz(filt / "ep/task_demo__demo_2.npz", obs_index=np.array([0, 3]), actions=np.ones((2, 7)))
    assert pretokenize.input_digest(ctx) == first  # other filter outputs changed: no re-encode
    write_npz(filt / "ep/task_demo__demo_2.npz", obs_index=np.array([0, 2]), actions=np.ones((2, 7)))
    assert pretokenize.input_digest(ctx)["frames"] != first["frames"]
    seeded = replace(cfg, image=replace(cfg.image, vq_seed=1))
    assert pretokenize.input_digest(make_ctx(seeded, world))["vq"] != first["vq"]


def test_runner_rerun_and_chunk_change_encode_nothing(cfg, world):
    root, filt = world

    def copy_filter(ctx: Context) -> Result:
        shutil.copytree(filt, ctx.out, dirs_exist_ok=True)
        return Result(counts={})

    stages = [Stage("filter", "1", ("source.*",), ("raw",), copy_filter), pretokenize.STAGE]
    done = Runner(cfg, stages, raw=root / "raw", cache=root / "cache", quiet=True).run()
    manifest = read_json(done["pretokenize"] / "stage.json")
    assert manifest["counts"]["encodes"] == 22 and manifest["untrained_tokenizer"]
    chunk = replace(cfg, conv=replace(cfg.conv, chunk=3))
    for c in (cfg, chunk):
        plan = Runner(c, stages, raw=root / "raw", cache=root / "cache", quiet=True).plan()
        assert all(st.hit for st in plan)


def test_decode_store_episode(cfg, world):
    ctx = make_ctx(cfg, world)
    pretokenize.run(ctx)
    images = encode.decode_store_episode(ctx.out, "task_demo__demo_2", [1], small_handle())
    assert images.shape == (1, 2, 64, 64, 3) and images.dtype == np.uint8
    paths = encode.decode_to_png(ctx.out, "task_demo__demo_2", ctx.out.parent / "png", frames=[0],
                                      vq_random_arch="small", device="cpu")
    assert [p.name for p in paths] == ["task_demo__demo_2_000000_front.png",
                                       "task_demo__demo_2_000000_wrist.png"]
    other = vq.load_vq(None, random_arch="small", seed=5, device="cpu")
    with pytest.raises(DataError, match="encoded with VQ weights"):
        encode.decode_store_episode(ctx.out, "task_demo__demo_2", None, other)


@pytest.mark.parametrize("sizes", [(1, 7), (3, 16)])
def test_batch_size_never_changes_the_bytes(cfg, world, sizes):
    outs = []
    for size in sizes:
        ctx = make_ctx(replace(cfg, image=replace(cfg.image, batch_size=size)), world, f"b{size}")
        pretokenize.run(ctx)
        outs.append(tree_bytes(ctx.out))
    assert outs[0] == outs[1] and len(outs[0]) == 4        # store.json + 3 codes files


def test_measured_batch_size_is_remembered(cfg, world, tmp_path, monkeypatch):
    monkeypatch.setenv("RYNN_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(vq_batch, "CANDIDATES", {"cpu": (1, 2, 4)})
    auto = replace(cfg, image=replace(cfg.image, batch_size=None))
    ctx = make_ctx(auto, world, "auto")
    pretokenize.run(ctx)
    tuning = read_json(tmp_path / "home" / vq_batch.TUNING_FILE)["entries"]
    (key, entry), = tuning.items()
    assert "64px" in key and entry["batch_size"] in (1, 2, 4)
    assert set(entry["images_per_s"]) <= {"1", "2", "4"} and entry["images_per_s"]["1"] > 0
    picked = replace(cfg, image=replace(cfg.image, batch_size=entry["batch_size"] % 4 + 1))
    other = make_ctx(picked, world, "other")
    pretokenize.run(other)
    assert tree_bytes(ctx.out) == tree_bytes(other.out)
    again = vq_batch.best_batch_size(small_handle(), 64, "fp32")
    assert again == (entry["batch_size"], "remembered")
