"""Small synthetic LeRobot datasets (v2.1 and v3.0) with real parquet schemas and real mp4 videos.

An SO100-like arm (6 joints: shoulder_pan, shoulder_lift, elbow_flex, wrist_flex, wrist_roll,
gripper) holds still, moves to a waypoint while closing its gripper, then holds again, so both
moving and static action chunks exist. The commanded joint positions are the actions; the
measured state follows them with one step of lag (state[t] = action[t-1]). Two cameras
(`observation.images.front`, `observation.images.wrist`) render a block whose position follows
the arm. With `identifiable=True` every frame also carries its global dataset index as a large
black/white barcode (`read_frame_index` decodes it), so a one-frame offset is detectable.

    from lerobot_fixtures import write_lerobot_dataset
    root = write_lerobot_dataset(tmp / "so100", version="v3.0", episodes=3, frames=30)

Episode i has `episode_lengths(episodes, frames)[i]` rows (lengths differ on purpose, so v3.0
episodes start at odd offsets inside shared files).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.media import video_encoder, write_video

JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
CAMERAS = ("observation.images.front", "observation.images.wrist")
TASKS = ("pick up the red block and put it in the bin", "push the red block to the left")
CHUNKS_SIZE = 1000
BARCODE_BITS = 16
_V21_DATA = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
_V21_VIDEO = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
_V30_DATA = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
_V30_VIDEO = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"


def episode_lengths(episodes: int, frames: int) -> list[int]:
    """Rows per episode: `frames`, `frames + 3`, `frames`, ..."""
    return [frames + 3 * (i % 2) for i in range(episodes)]


# ---------------------------------------------------------------------------------------------
# Trajectories and images
# ---------------------------------------------------------------------------------------------

def _ease(n: int) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, n))


def trajectory(length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(states, actions), both (length, 6) float32 in degrees: hold, move + grip, hold."""
    start = np.append(rng.uniform(-40, 40, 5), 40.0)
    goal = np.append(rng.uniform(-40, 40, 5), 5.0)
    hold0 = max(1, length // 4)
    move = max(2, (length * 7) // 20)
    ramp = _ease(move)[:, None]
    plan = np.concatenate([np.repeat(start[None], hold0, 0), start + ramp * (goal - start),
                           np.repeat(goal[None], max(0, length - hold0 - move), 0)])[:length]
    actions = plan.astype(np.float32)
    states = np.concatenate([actions[:1], actions[:-1]])
    return states, actions


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a frame size: a side, or (height, width) for non-square frames."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _render(state: np.ndarray, size: int | tuple[int, int], wrist: bool) -> np.ndarray:
    """A table, a red block placed by the arm's pan/lift joints, a gripper bar by its opening."""
    h, w = _hw(size)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = (40, 90, 50) if wrist else (70, 70, 80)
    img[h // 2:] = (150, 120, 90)
    scale = 2.0 if wrist else 1.0
    cx = int(w / 2 + scale * state[0] / 90 * w / 2)
    cy = int(h * 0.6 + scale * state[1] / 90 * h / 4)
    half = max(2, int(min(h, w) / 10 * scale))
    img[max(0, cy - half):max(0, cy + half), max(0, cx - half):max(0, cx + half)] = (200, 30, 30)
    bar = int(np.clip(state[5], 0, 40) / 40 * (w - 2))
    img[-3:, :bar] = (230, 230, 230)
    return img


def _barcode_cell(size: int) -> int:
    return size // (BARCODE_BITS // 2)


def draw_frame_index(img: np.ndarray, index: int) -> np.ndarray:
    """Paint `index` as 16 black/white cells (2 rows x 8) across the top of the image."""
    cell = _barcode_cell(img.shape[1])
    for bit in range(BARCODE_BITS):
        r, c = divmod(bit, BARCODE_BITS // 2)
        img[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = 255 * ((index >> bit) & 1)
    return img


def read_frame_index(img: np.ndarray) -> int:
    """Inverse of `draw_frame_index` on a decoded (lossy) frame: the centre of each cell."""
    cell = _barcode_cell(img.shape[1])
    lo, hi = cell // 4, cell - cell // 4
    index = 0
    for bit in range(BARCODE_BITS):
        r, c = divmod(bit, BARCODE_BITS // 2)
        patch = img[r * cell + lo:r * cell + hi, c * cell + lo:c * cell + hi]
        index |= int(patch.mean() > 127) << bit
    return index


def _frames(states: np.ndarray, first_index: int, size: int, wrist: bool,
            identifiable: bool) -> list[np.ndarray]:
    out = []
    for t, state in enumerate(states):
        img = _render(state, size, wrist)
        out.append(draw_frame_index(img, first_index + t) if identifiable else img)
    return out


# ---------------------------------------------------------------------------------------------
# Writers: video, parquet, json
# ---------------------------------------------------------------------------------------------

def _vector(rows: np.ndarray) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(rows, np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, rows.shape[1])


def _data_table(states: np.ndarray, actions: np.ndarray, episode: int, first_index: int,
                task_index: int, fps: int) -> pa.Table:
    n = len(states)
    frame = np.arange(n, dtype=np.int64)
    return pa.table({
        "observation.state": _vector(states),
        "action": _vector(actions),
        "timestamp": pa.array((frame / fps).astype(np.float32)),
        "frame_index": pa.array(frame),
        "episode_index": pa.array(np.full(n, episode, np.int64)),
        "index": pa.array(first_index + frame),
        "task_index": pa.array(np.full(n, task_index, np.int64)),
    })


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _write_parquet(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _features(size: int | tuple[int, int], fps: int, codec: str) -> dict:
    vec = {"dtype": "float32", "shape": [len(JOINTS)], "names": list(JOINTS)}
    h, w = _hw(size)
    video = {"dtype": "video", "shape": [h, w, 3], "names": ["height", "width", "channels"],
             "info": {"video.height": h, "video.width": w, "video.codec": codec,
                      "video.pix_fmt": "yuv420p", "video.is_depth_map": False,
                      "video.fps": fps, "video.channels": 3, "has_audio": False}}
    scalar = {"shape": [1], "names": None}
    return {"action": vec, "observation.state": dict(vec), **{k: video for k in CAMERAS},
            "timestamp": {"dtype": "float32", **scalar},
            **{k: {"dtype": "int64", **scalar}
               for k in ("frame_index", "episode_index", "index", "task_index")}}


def _info(version: str, lengths: list[int], fps: int, size: int, codec: str) -> dict:
    info = {"codebase_version": version, "robot_type": "so100", "total_episodes": len(lengths),
            "total_frames": int(sum(lengths)), "total_tasks": len(TASKS),
            "chunks_size": CHUNKS_SIZE, "fps": fps, "splits": {"train": f"0:{len(lengths)}"}}
    if version == "v2.1":
        info.update(total_videos=len(lengths) * len(CAMERAS), total_chunks=1,
                    data_path=_V21_DATA, video_path=_V21_VIDEO)
    else:
        info.update(data_files_size_in_mb=100, video_files_size_in_mb=500,
                    data_path=_V30_DATA, video_path=_V30_VIDEO)
    info["features"] = _features(size, fps, codec)
    return info


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------

def _episodes(episodes: int, frames: int, seed: int) -> list[dict]:
    """Per episode: index, task_index, first global row, states, actions."""
    out, first = [], 0
    for i, length in enumerate(episode_lengths(episodes, frames)):
        states, actions = trajectory(length, np.random.default_rng([seed, i]))
        out.append({"index": i, "task_index": i % len(TASKS), "first": first,
                    "states": states, "actions": actions})
        first += length
    return out


def _camera_frames(ep: dict, camera: str, size: int, identifiable: bool) -> list[np.ndarray]:
    return _frames(ep["states"], ep["first"], size, camera.endswith("wrist"), identifiable)


def _write_v21(out: Path, eps: list[dict], fps: int, size: int, codec: str,
               identifiable: bool) -> None:
    for ep in eps:
        fields = {"episode_chunk": ep["index"] // CHUNKS_SIZE, "episode_index": ep["index"]}
        table = _data_table(ep["states"], ep["actions"], ep["index"], ep["first"],
                            ep["task_index"], fps)
        _write_parquet(out / _V21_DATA.format(**fields), table)
        for cam in CAMERAS:
            write_video(out / _V21_VIDEO.format(video_key=cam, **fields),
                        _camera_frames(ep, cam, size, identifiable), fps, codec)
    _write_jsonl(out / "meta/tasks.jsonl",
                 [{"task_index": i, "task": t} for i, t in enumerate(TASKS)])
    _write_jsonl(out / "meta/episodes.jsonl",
                 [{"episode_index": ep["index"], "tasks": [TASKS[ep["task_index"]]],
                   "length": len(ep["states"])} for ep in eps])


def _groups(n: int, per_file: int) -> list[list[int]]:
    return [list(range(s, min(n, s + per_file))) for s in range(0, n, per_file)]


def _write_v30_data(out: Path, eps: list[dict], fps: int, per_file: int,
                    rows: list[dict]) -> None:
    for file_index, group in enumerate(_groups(len(eps), per_file)):
        tables = [_data_table(eps[i]["states"], eps[i]["actions"], i, eps[i]["first"],
                              eps[i]["task_index"], fps) for i in group]
        _write_parquet(out / _V30_DATA.format(chunk_index=0, file_index=file_index),
                       pa.concat_tables(tables))
        for i in group:
            rows[i].update({"data/chunk_index": 0, "data/file_index": file_index,
                            "dataset_from_index": eps[i]["first"],
                            "dataset_to_index": eps[i]["first"] + len(eps[i]["states"])})


def _write_v30_videos(out: Path, eps: list[dict], fps: int, size: int, codec: str,
                      identifiable: bool, per_file: int, rows: list[dict]) -> None:
    for cam in CAMERAS:
        for file_index, group in enumerate(_groups(len(eps), per_file)):
            frames: list[np.ndarray] = []
            for i in group:
                start = len(frames) / fps
                frames += _camera_frames(eps[i], cam, size, identifiable)
                rows[i].update({f"videos/{cam}/chunk_index": 0,
                                f"videos/{cam}/file_index": file_index,
                                f"videos/{cam}/from_timestamp": start,
                                f"videos/{cam}/to_timestamp": len(frames) / fps})
            write_video(out / _V30_VIDEO.format(video_key=cam, chunk_index=0,
                                                file_index=file_index), frames, fps, codec)


def _write_v30(out: Path, eps: list[dict], fps: int, size: int, codec: str,
               identifiable: bool, per_data_file: int, per_video_file: int) -> None:
    rows = [{"episode_index": ep["index"], "tasks": [TASKS[ep["task_index"]]],
             "length": len(ep["states"]), "meta/episodes/chunk_index": 0,
             "meta/episodes/file_index": 0} for ep in eps]
    _write_v30_data(out, eps, fps, per_data_file, rows)
    _write_v30_videos(out, eps, fps, size, codec, identifiable, per_video_file, rows)
    _write_parquet(out / "meta/episodes/chunk-000/file-000.parquet", pa.Table.from_pylist(rows))
    _write_parquet(out / "meta/tasks.parquet",
                   pa.table({"task_index": pa.array(range(len(TASKS)), pa.int64()),
                             "task": pa.array(TASKS)}))


def write_lerobot_dataset(out: Path, *, version: str = "v2.1", episodes: int = 3,
                          frames: int = 30, fps: int = 30, size: int | tuple[int, int] = 64,
                          codec: str = "h264",
                          seed: int = 0, identifiable: bool = False, episodes_per_file: int = 2,
                          episodes_per_video_file: int = 3) -> Path:
    """Write a synthetic SO100-like LeRobot dataset under `out` and return `out`.

    `size`: the frame side, or (height, width) for non-square frames (e.g. (480, 640)).
    v3.0 packs `episodes_per_file` episodes per data parquet and `episodes_per_video_file` per
    mp4 (different on purpose: real datasets roll data and video files over independently).
    `codec`: "h264" (libx264) or "av1" (libsvtav1).
    """
    if version not in ("v2.1", "v3.0"):
        raise ValueError(f"version must be 'v2.1' or 'v3.0', got {version!r}")
    video_encoder(codec)
    out = Path(out)
    eps = _episodes(episodes, frames, seed)
    if version == "v2.1":
        _write_v21(out, eps, fps, size, codec, identifiable)
    else:
        _write_v30(out, eps, fps, size, codec, identifiable, episodes_per_file,
                   episodes_per_video_file)
    _write_json(out / "meta/info.json",
                _info(version, [len(ep["states"]) for ep in eps], fps, size, codec))
    return out
