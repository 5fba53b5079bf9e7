"""LeRobot reader (stages/lerobot.py) on synthetic v2.1 / v3.0 datasets from lerobot_fixtures.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_lerobot.py -q
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.actions import is_static_chunk, relative_chunk
from pipeline.config import SourceConfig
from pipeline.errors import DataError
from lerobot_fixtures import (TASKS, episode_lengths, read_frame_index, trajectory,
                                       write_lerobot_dataset, write_video)
from stages import lerobot, source

EPISODES, FRAMES, FPS = 4, 24, 30
CFG = SourceConfig(format="auto", rotate_180=False)
ARM = (0, 1, 2, 3, 4)
NO_LIBERO = pytest.mark.skipif(importlib.util.find_spec("stages.libero") is None,
                               reason="stages/libero.py not written yet")


@pytest.fixture(scope="module")
def v21(tmp_path_factory) -> Path:
    return write_lerobot_dataset(tmp_path_factory.mktemp("v21") / "ds", version="v2.1",
                                 episodes=EPISODES, frames=FRAMES, fps=FPS, codec="h264",
                                 identifiable=True)


@pytest.fixture(scope="module")
def v30(tmp_path_factory) -> Path:
    return write_lerobot_dataset(tmp_path_factory.mktemp("v30") / "ds", version="v3.0",
                                 episodes=EPISODES, frames=FRAMES, fps=FPS, codec="av1",
                                 identifiable=True)


@pytest.fixture(params=["v21", "v30"])
def dataset(request) -> Path:
    return request.getfixturevalue(request.param)


def _copy(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root, tmp_path / "copy"))


def _load(root: Path, index: int, cfg: SourceConfig = CFG):
    return lerobot.load(root, lerobot.scan(root, cfg)[index], cfg)


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------

def test_detects_both_lerobot_versions(v21, v30):
    assert source.reader(v21, CFG) is lerobot
    assert source.reader(v30, CFG) is lerobot
    assert source.format_name(v30, CFG) == "lerobot"


@NO_LIBERO
def test_unknown_directory_names_what_was_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("not a dataset")
    with pytest.raises(DataError, match="LIBERO.*LeRobot.*meta/info.json"):
        source.reader(tmp_path, CFG)


@NO_LIBERO
def test_detects_libero_directory(tmp_path):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "pick_up_the_block_demo.hdf5", "w") as f:
        f.create_dataset("data/demo_0/actions", data=np.zeros((3, 7)))
    assert source.format_name(tmp_path, CFG) == "libero"


def test_unknown_version_names_file_and_supported_versions(v21, tmp_path):
    root = _copy(v21, tmp_path)
    info = json.loads((root / "meta/info.json").read_text())
    (root / "meta/info.json").write_text(json.dumps({**info, "codebase_version": "v2.0"}))
    with pytest.raises(DataError, match=r"'v2.0'.*v2.1, v3.0.*meta/info.json"):
        lerobot.scan(root, CFG)


# ---------------------------------------------------------------------------------------------
# Rows, states, actions, instruction
# ---------------------------------------------------------------------------------------------

def test_scan_lists_every_episode(dataset):
    refs = lerobot.scan(dataset, CFG)
    assert [r.key for r in refs] == [f"episode_{i:06d}" for i in range(EPISODES)]
    assert [r.length for r in refs] == episode_lengths(EPISODES, FRAMES)
    assert [r.task for r in refs] == [TASKS[i % len(TASKS)] for i in range(EPISODES)]
    assert all((dataset / r.source).is_file() for r in refs)
    assert len({r.episode_id for r in refs}) == EPISODES


def test_load_rows_states_actions_instruction(dataset):
    for i, length in enumerate(episode_lengths(EPISODES, FRAMES)):
        ep = _load(dataset, i)
        states, actions = trajectory(length, np.random.default_rng([0, i]))
        assert ep.states.dtype == np.float64 and ep.states.shape == (length, 6)
        np.testing.assert_array_equal(ep.states, states.astype(np.float64))
        np.testing.assert_array_equal(ep.actions, actions.astype(np.float64))
        assert ep.instruction == TASKS[i % len(TASKS)]
        assert ep.obs_after_action is False
        assert ep.image_size == (64, 64)
        assert ep.meta["format"] == "lerobot" and ep.meta["fps"] == FPS
        assert ep.meta["version"] == ("v2.1" if "v21" in str(dataset) else "v3.0")


# ---------------------------------------------------------------------------------------------
# Frames matched to parquet rows
# ---------------------------------------------------------------------------------------------

def _global_index(root: Path, ref) -> np.ndarray:
    table = pq.read_table(root / ref.source, columns=["episode_index", "index"])
    mine = np.asarray(table["episode_index"]) == int(ref.key.split("_")[1])
    return np.asarray(table["index"])[mine]


def test_every_frame_matches_its_parquet_row(dataset):
    for ref in lerobot.scan(dataset, CFG):
        ep = lerobot.load(dataset, ref, CFG)
        expected = _global_index(dataset, ref).tolist()
        for view in ("front", "wrist"):
            frames = ep.load_frames(view, np.arange(ref.length))
            assert frames.shape == (ref.length, 64, 64, 3) and frames.dtype == np.uint8
            assert [read_frame_index(f) for f in frames] == expected, (ref.key, view)


def test_v30_episodes_start_mid_file(v30):
    meta = pq.read_table(v30 / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert meta[1]["data/file_index"] == 0 and meta[1]["dataset_from_index"] > 0
    assert meta[1]["videos/observation.images.front/from_timestamp"] > 0
    assert meta[3]["videos/observation.images.front/file_index"] == 1


def test_subset_unordered_and_repeated_rows(dataset):
    ref = lerobot.scan(dataset, CFG)[1]
    ep = lerobot.load(dataset, ref, CFG)
    rows = np.array([20, 3, 3, 0, ref.length - 1])
    got = [read_frame_index(f) for f in ep.load_frames("front", rows)]
    assert got == _global_index(dataset, ref)[rows].tolist()


def test_decodes_only_the_requested_span(v30, monkeypatch):
    """Episode 1 sits mid-file: decoding starts at the keyframe before it and stops after it."""
    seen = []
    match = lerobot._match

    def counting(frames, *args):
        return match((seen.append(f.time) or f for f in frames), *args)

    monkeypatch.setattr(lerobot, "_match", counting)
    ep = _load(v30, 1)
    start = lerobot._dataset(v30).episodes[1].videos["observation.images.front"].start
    ep.load_frames("front", np.arange(ep.ref.length))
    assert start > 0 and min(seen) > 0 and min(seen) >= start - 10 / FPS   # keyframe every 10
    assert max(seen) <= start + (ep.ref.length - 1) / FPS + 1e-6


def test_rotate_180_flips_both_axes(v30):
    rows = np.arange(5)
    plain = _load(v30, 2).load_frames("wrist", rows)
    rotated = _load(v30, 2, replace(CFG, rotate_180=True)).load_frames("wrist", rows)
    np.testing.assert_array_equal(rotated, plain[:, ::-1, ::-1])


def test_one_frame_offset_is_visible(v30, tmp_path):
    """Shift episode 1's video span by one frame: its frames no longer match its rows."""
    root = _copy(v30, tmp_path)
    path = root / "meta/episodes/chunk-000/file-000.parquet"
    rows = pq.read_table(path).to_pylist()
    for cam in ("front", "wrist"):
        for end in ("from_timestamp", "to_timestamp"):
            rows[1][f"videos/observation.images.{cam}/{end}"] += 1 / FPS
    pq.write_table(pa.Table.from_pylist(rows), path)
    ref = lerobot.scan(root, CFG)[1]
    got = [read_frame_index(f) for f in _load(root, 1).load_frames("front", np.arange(3))]
    assert got == (_global_index(root, ref)[:3] + 1).tolist()


# ---------------------------------------------------------------------------------------------
# SO100 recipe transforms on hand-computed values
# ---------------------------------------------------------------------------------------------

def test_relative_chunk_hand_computed():
    states = np.array([[1.0, 2, 3, 4, 5, 40], [2, 2, 2, 2, 2, 30], [0, 0, 0, 0, 0, 0]])
    actions = np.array([[2.0, 2, 3, 4, 5, 30], [3, 3, 3, 3, 3, 20], [4, 4, 4, 4, 4, 10]])
    got = relative_chunk(actions, states, 1, 2, ARM)
    np.testing.assert_array_equal(got, [[1, 1, 1, 1, 1, 20], [2, 2, 2, 2, 2, 10]])
    np.testing.assert_array_equal(actions[1], [3, 3, 3, 3, 3, 20])  # input untouched


def test_static_chunk_hand_computed():
    states = np.array([[1.0, 1, 1, 1, 1, 9]] * 3 + [[1.0, 1, 1, 1, 1.01, 9]])
    actions = np.array([[1.0, 1, 1, 1, 1, 9], [1, 1, 1, 1, 1.0005, 9], [1, 1, 1, 1, 1.01, 9],
                        [1, 1, 1, 1, 1.01, 9]])
    assert is_static_chunk(actions, states, 0, 2, 1e-3)
    assert not is_static_chunk(actions, states, 0, 3, 1e-3)     # arm moves at step 2
    assert is_static_chunk(actions, states, 3, 1, 1e-3)
    gripper_moves = actions.copy()
    gripper_moves[1, 5] = 5
    assert not is_static_chunk(gripper_moves, states, 0, 2, 1e-3)


def test_static_chunks_of_loaded_episode(v21):
    """Fixture: hold L//4 frames, ramp 7L//20 frames (its first step is still the start pose,
    its last the goal), hold; the state lags the action by one step."""
    k, length = 5, FRAMES
    ep = _load(v21, 0)
    hold, move = length // 4, (length * 7) // 20
    expected = [t for t in range(length - k + 1)
                if t + k <= hold + 1 or t >= hold + move]
    got = [t for t in range(length - k + 1) if is_static_chunk(ep.actions, ep.states, t, k, 1e-3)]
    assert got == expected
    t = hold + 1
    chunk = relative_chunk(ep.actions, ep.states, t, k, ARM)
    np.testing.assert_allclose(chunk[:, :5], ep.actions[t:t + k, :5] - ep.states[t, :5])
    np.testing.assert_array_equal(chunk[:, 5], ep.actions[t:t + k, 5])


# ---------------------------------------------------------------------------------------------
# Bad input: DataError naming the episode and the file
# ---------------------------------------------------------------------------------------------

FRONT_V21 = "videos/chunk-000/observation.images.front/episode_000001.mp4"
FRONT_V30 = "videos/observation.images.front/chunk-000/file-000.mp4"


def test_garbage_video(v21, tmp_path):
    root = _copy(v21, tmp_path)
    (root / FRONT_V21).write_bytes(b"\x00garbage" * 500)
    with pytest.raises(DataError, match="unreadable video") as e:
        _load(root, 1)
    assert f"file={FRONT_V21}" in str(e.value) and "episode=episode_000001" in str(e.value)


def test_truncated_video(v30, tmp_path):
    root = _copy(v30, tmp_path)
    data = (root / FRONT_V30).read_bytes()
    (root / FRONT_V30).write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError) as e:
        _load(root, 1).load_frames("front", np.arange(5))
    assert e.value.file == FRONT_V30 and e.value.episode == "episode_000001"


def test_missing_episode_data_file(v21, tmp_path):
    root = _copy(v21, tmp_path)
    (root / "data/chunk-000/episode_000002.parquet").unlink()
    with pytest.raises(DataError, match="missing") as e:
        _load(root, 2)
    assert e.value.file == "data/chunk-000/episode_000002.parquet"
    assert e.value.episode == "episode_000002"


def test_missing_video_file(v30, tmp_path):
    root = _copy(v30, tmp_path)
    (root / "videos/observation.images.wrist/chunk-000/file-001.mp4").unlink()
    with pytest.raises(DataError, match="missing video") as e:
        _load(root, 3)
    assert e.value.episode == "episode_000003" and e.value.file.endswith("file-001.mp4")


def test_video_with_fewer_frames_than_rows(v21, tmp_path):
    root = _copy(v21, tmp_path)
    frames = [np.zeros((64, 64, 3), np.uint8)] * (FRAMES - 2)
    write_video(root / "videos/chunk-000/observation.images.wrist/episode_000000.mp4",
                frames, FPS, "h264")
    with pytest.raises(DataError, match=f"{FRAMES - 2} frames.*{FRAMES} parquet rows") as e:
        _load(root, 0)
    assert e.value.episode == "episode_000000" and "episode_000000.mp4" in e.value.file


def test_v30_rows_disagree_with_metadata(v30, tmp_path):
    root = _copy(v30, tmp_path)
    path = root / "data/chunk-000/file-000.parquet"
    table = pq.read_table(path)
    pq.write_table(table.slice(0, table.num_rows - 1), path)   # drop episode 1's last row
    with pytest.raises(DataError, match="rows but the episodes metadata") as e:
        _load(root, 1)
    assert e.value.file == "data/chunk-000/file-000.parquet"


def test_timestamps_outside_video(v30, tmp_path):
    root = _copy(v30, tmp_path)
    path = root / "data/chunk-000/file-001.parquet"
    table = pq.read_table(path)
    shifted = pa.array(np.asarray(table["timestamp"]) + np.float32(5.0))
    pq.write_table(table.set_column(table.schema.get_field_index("timestamp"), "timestamp",
                                    shifted), path)
    with pytest.raises(DataError, match="outside") as e:
        _load(root, 2)
    assert e.value.episode == "episode_000002" and e.value.file == FRONT_V30


def test_frame_missing_at_timestamp(v21):
    ref = lerobot.scan(v21, CFG)[0]
    video = lerobot._dataset(v21).episodes[0].videos["observation.images.front"]
    with pytest.raises(DataError, match="no video frame at t=2.0000") as e:
        lerobot.decode_at(v21, video, np.array([0.0, 2.0]), FPS, ref.key)
    assert e.value.file.endswith("episode_000000.mp4")


def test_nan_action(v21, tmp_path):
    root = _copy(v21, tmp_path)
    path = root / "data/chunk-000/episode_000001.parquet"
    table = pq.read_table(path)
    values = np.asarray(table["action"].combine_chunks().flatten()).copy()
    values[7] = np.nan
    col = pa.FixedSizeListArray.from_arrays(pa.array(values), 6)
    pq.write_table(table.set_column(table.schema.get_field_index("action"), "action", col), path)
    with pytest.raises(DataError, match="NaN.*frame 1") as e:
        _load(root, 1)
    assert e.value.key == "action" and e.value.episode == "episode_000001"


def test_missing_feature_key(v30):
    cfg = replace(CFG, lerobot_state_key="observation.joints")
    with pytest.raises(DataError, match="observation.state") as e:
        lerobot.scan(v30, cfg)
    assert e.value.key == "observation.joints" and e.value.file == "meta/info.json"


def test_missing_camera_key_lists_video_features(v21):
    cfg = replace(CFG, lerobot_wrist_key="observation.images.top")
    with pytest.raises(DataError, match="observation.images.front, observation.images.wrist"):
        lerobot.scan(v21, cfg)


# ---------------------------------------------------------------------------------------------
# End to end: rynn-pipe tokenize --raw <LeRobot dataset> -> shards that pass verify
# ---------------------------------------------------------------------------------------------

PIPELINE_MODULES = ("stages.filter", "stages.fit_bins", "stages.pretokenize",
                    "stages.shards_stage", "shards.verify")


def _missing_modules() -> list[str]:
    return [m for m in PIPELINE_MODULES if importlib.util.find_spec(m) is None]


@pytest.mark.skipif(bool(_missing_modules()), reason="pipeline stages not written yet")
@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_tokenize_lerobot_end_to_end(version, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app
    raw = write_lerobot_dataset(tmp_path / "raw", version=version, episodes=3, frames=FRAMES,
                                codec="av1" if version == "v3.0" else "h264")
    out = tmp_path / "out"
    sets = ["image.vq_random_arch=small", "image.resolution=64", "source.rotate_180=false"]
    args = ["tokenize", "--raw", str(raw), "--recipe", "so100", "--out", str(out)]
    result = CliRunner().invoke(app, args + [a for s in sets for a in ("--set", s)])
    assert result.exit_code == 0, result.output
    verified = CliRunner().invoke(app, ["verify", str(out / "shards")])
    assert verified.exit_code == 0, verified.output
