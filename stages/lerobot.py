"""LeRobot dataset reader (codebase v2.1 and v3.0) on pyarrow + PyAV; no `lerobot` dependency.

    from stages import lerobot
    refs = lerobot.scan(root, cfg.source)          # one EpisodeRef per episode, by episode index
    ep = lerobot.load(root, refs[0], cfg.source)   # parquet rows now, video frames on demand
    front = ep.load_frames("front", np.arange(ep.ref.length))

Layouts (SPEC.md 1.2), both described by `meta/info.json` (`data_path`/`video_path` templates):
- v2.1: one parquet and one mp4 per camera per episode; `meta/episodes.jsonl`, `meta/tasks.jsonl`.
- v3.0: many episodes per data parquet and per mp4; `meta/episodes/chunk-*/file-*.parquet` locates
  each episode by data file + global row range and, per camera, video file + from/to timestamps;
  `meta/tasks.parquet`.

LeRobot pairs observation row t with action row t (obs_after_action False). Frames are matched
to parquet rows by time: row `timestamp` (+ the episode's `from_timestamp` in v3.0) must equal a
decoded frame's presentation time within half a frame period. Decoding seeks to the keyframe
before the first wanted time and stops after the last, so only the requested rows' span is
decoded, never a whole multi-episode file. LeRobot videos are stored upright; frames are rotated
180 degrees only when `source.rotate_180` is set (the so100 recipe should set it to false).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import SourceConfig
from pipeline.episode import Episode, EpisodeRef
from pipeline.errors import DataError
from pipeline.io import read_jsonl

SUPPORTED_VERSIONS = ("v2.1", "v3.0")
INFO = "meta/info.json"
_ROW_COLUMNS = ("timestamp", "frame_index", "episode_index", "index", "task_index")


@dataclass(frozen=True)
class _Video:
    file: str                 # mp4 path relative to the root
    start: float              # the episode's first frame time in that file (v3.0 from_timestamp)
    end: float | None         # v3.0 to_timestamp; None for v2.1 (the whole file)


@dataclass(frozen=True)
class _EpisodeMeta:
    index: int
    task: str
    length: int
    data_file: str                  # parquet path relative to the root
    rows: tuple[int, int] | None    # v3.0 global [from, to) row range
    videos: dict[str, _Video]


@dataclass(frozen=True)
class _Dataset:
    version: str
    fps: float
    features: dict
    tasks: dict[int, str]
    episodes: dict[int, _EpisodeMeta]


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------

def detect(root: Path) -> bool:
    return (Path(root) / INFO).is_file()


def _read_json(path: Path, rel: str) -> dict:
    if not path.is_file():
        raise DataError("missing LeRobot metadata file", file=rel)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"invalid JSON: {e}", file=rel) from e


def _read_jsonl(root: Path, rel: str) -> list[dict]:
    path = root / rel
    if not path.is_file():
        raise DataError("missing LeRobot metadata file", file=rel)
    return read_jsonl(path)


def _read_parquet(root: Path, rel: str, episode: str | None = None, **kwargs) -> pa.Table:
    path = root / rel
    if not path.is_file():
        raise DataError("missing parquet file", file=rel, episode=episode)
    try:
        return pq.read_table(path, **kwargs)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"unreadable parquet file: {e}", file=rel, episode=episode) from e


def _parquet_columns(root: Path, rel: str, episode: str | None) -> list[str]:
    if not (root / rel).is_file():
        raise DataError("missing episode data file", file=rel, episode=episode)
    try:
        return pq.read_schema(root / rel).names
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"unreadable parquet file: {e}", file=rel, episode=episode) from e


def _info(root: Path) -> dict:
    info = _read_json(root / INFO, INFO)
    version = info.get("codebase_version")
    if version not in SUPPORTED_VERSIONS:
        raise DataError(
            f"unsupported LeRobot codebase_version {version!r}; supported: "
            f"{', '.join(SUPPORTED_VERSIONS)} (convert the dataset with lerobot's conversion "
            "script first)", file=INFO, key="codebase_version")
    needed = ["fps", "features", "data_path"]
    if any(f.get("dtype") == "video" for f in info.get("features", {}).values()):
        needed.append("video_path")
    for key in needed:
        if key not in info:
            raise DataError("missing key in LeRobot info.json", file=INFO, key=key)
    return info


def _format(template: str, rel: str, **fields) -> str:
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        raise DataError(f"bad path template {template!r}: {e}", file=INFO, key=rel) from e


def _video_keys(info: dict) -> list[str]:
    return sorted(k for k, f in info["features"].items() if f.get("dtype") == "video")


def _v21_episodes(root: Path, info: dict) -> dict[int, _EpisodeMeta]:
    chunks = int(info.get("chunks_size", 1000))
    out = {}
    for row in _read_jsonl(root, "meta/episodes.jsonl"):
        i = int(row["episode_index"])
        fields = {"episode_chunk": i // chunks, "episode_index": i}
        videos = {k: _Video(_format(info["video_path"], "video_path", video_key=k,
                                    **fields), 0.0, None) for k in _video_keys(info)}
        names = row.get("tasks") or [""]
        out[i] = _EpisodeMeta(i, str(names[0]), int(row["length"]),
                              _format(info["data_path"], "data_path", **fields), None, videos)
    return out


def _v30_episode(row: dict, info: dict, videos: list[str]) -> _EpisodeMeta:
    data = _format(info["data_path"], "data_path", chunk_index=row["data/chunk_index"],
                   file_index=row["data/file_index"])
    vids = {}
    for k in videos:
        p = f"videos/{k}/"
        vids[k] = _Video(_format(info["video_path"], "video_path", video_key=k,
                                 chunk_index=row[p + "chunk_index"],
                                 file_index=row[p + "file_index"]),
                         float(row[p + "from_timestamp"]), float(row[p + "to_timestamp"]))
    rows = (int(row["dataset_from_index"]), int(row["dataset_to_index"]))
    return _EpisodeMeta(int(row["episode_index"]), str((row.get("tasks") or [""])[0]),
                        int(row["length"]), data, rows, vids)


def _v30_episodes(root: Path, info: dict) -> dict[int, _EpisodeMeta]:
    files = sorted((root / "meta/episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise DataError("no episodes metadata (meta/episodes/chunk-*/file-*.parquet)",
                        file="meta/episodes")
    out = {}
    for path in files:
        rel = path.relative_to(root).as_posix()
        for row in _read_parquet(root, rel).to_pylist():
            try:
                ep = _v30_episode(row, info, _video_keys(info))
            except KeyError as e:
                raise DataError("missing column in episodes metadata", file=rel,
                                key=str(e.args[0])) from e
            out[ep.index] = ep
    return out


def _tasks(root: Path, version: str) -> dict[int, str]:
    if version == "v2.1":
        return {int(r["task_index"]): str(r["task"]) for r in _read_jsonl(root, "meta/tasks.jsonl")}
    table = _read_parquet(root, "meta/tasks.parquet")
    name = next((c for c in ("task", "__index_level_0__") if c in table.column_names), None)
    if name is None or "task_index" not in table.column_names:
        raise DataError("tasks table needs columns task_index and task", file="meta/tasks.parquet")
    return dict(zip(table["task_index"].to_pylist(), table[name].to_pylist()))


@functools.lru_cache(maxsize=4)
def _dataset_cached(root: str, stamp: tuple) -> _Dataset:
    path = Path(root)
    info = _info(path)
    version = info["codebase_version"]
    tasks = _tasks(path, version)
    episodes = (_v21_episodes(path, info) if version == "v2.1"
                else _v30_episodes(path, info))
    return _Dataset(version, float(info["fps"]), info["features"], tasks, episodes)


def _dataset(root: Path) -> _Dataset:
    """The parsed metadata, cached until a file under meta/ changes."""
    root = Path(root).resolve()
    meta = root / "meta"
    stamp = tuple(sorted((p.as_posix(), p.stat().st_mtime_ns, p.stat().st_size)
                         for p in meta.rglob("*") if p.is_file())) if meta.is_dir() else ()
    return _dataset_cached(str(root), stamp)


def _camera_keys(cfg: SourceConfig) -> dict[str, str]:
    return {"front": cfg.lerobot_front_key, "wrist": cfg.lerobot_wrist_key}


def _check_features(ds: _Dataset, cfg: SourceConfig) -> None:
    for key in (cfg.lerobot_state_key, cfg.lerobot_action_key):
        if key not in ds.features:
            raise DataError(f"feature not in dataset; it has: {', '.join(sorted(ds.features))}",
                            file=INFO, key=key)
    videos = [k for k, f in ds.features.items() if f.get("dtype") == "video"]
    for key in _camera_keys(cfg).values():
        if key not in videos:
            raise DataError(f"camera is not a video feature of this dataset; video features: "
                            f"{', '.join(sorted(videos)) or 'none'} (set source.lerobot_front_key "
                            "/ source.lerobot_wrist_key)", file=INFO, key=key)


def scan(root: Path, cfg: SourceConfig) -> list[EpisodeRef]:
    """One EpisodeRef per episode, sorted by episode index."""
    ds = _dataset(Path(root))
    _check_features(ds, cfg)
    _check_data_files(Path(root), ds)
    return [EpisodeRef(source=ep.data_file, key=f"episode_{i:06d}", task=ep.task,
                       length=ep.length) for i, ep in sorted(ds.episodes.items())]


def _check_data_files(root: Path, ds: _Dataset) -> None:
    """Every episode in the data files is in the episodes metadata (none silently ignored), and
    every parquet file under data/ belongs to a listed episode."""
    files: dict[str, set[int]] = {}
    for i, ep in ds.episodes.items():
        files.setdefault(ep.data_file, set()).add(i)
    for path in sorted((root / "data").rglob("*.parquet")) if (root / "data").is_dir() else ():
        rel = path.relative_to(root).as_posix()
        if rel not in files:
            raise DataError("data file holds no episode listed in the episodes metadata (add its "
                            "episodes to meta/ or remove the file)", file=rel)
    for rel, listed in sorted(files.items()):
        if not (root / rel).is_file():
            continue                      # reported with the episode when it is loaded
        found = set(_read_parquet(root, rel, columns=["episode_index"])["episode_index"]
                    .to_pylist())
        extra = sorted(found - listed)
        if extra:
            raise DataError(f"episode_index {extra[0]} is in the data file but not in the episodes "
                            f"metadata ({len(extra)} such episode(s)); fix meta/ or remove its "
                            "rows", file=rel, key="episode_index")


# ---------------------------------------------------------------------------------------------
# Parquet rows of one episode
# ---------------------------------------------------------------------------------------------

def _episode_index(ref: EpisodeRef, ds: _Dataset) -> int:
    head, _, digits = ref.key.partition("_")
    if head != "episode" or not digits.isdigit() or int(digits) not in ds.episodes:
        raise DataError("no such episode in the LeRobot metadata", file=ref.source,
                        episode=ref.key)
    return int(digits)


def _rows(root: Path, ep: _EpisodeMeta, cfg: SourceConfig, where: dict) -> pa.Table:
    columns = [cfg.lerobot_state_key, cfg.lerobot_action_key, *_ROW_COLUMNS]
    names = _parquet_columns(root, ep.data_file, where["episode"])
    for key in columns:
        if key not in names:
            raise DataError("missing column in episode data", key=key, **where)
    filters = [("episode_index", "=", ep.index)] if ep.rows else None
    table = _read_parquet(root, ep.data_file, episode=where["episode"], columns=columns,
                          filters=filters)
    return table.sort_by("frame_index")


def _matrix(table: pa.Table, key: str, where: dict) -> np.ndarray:
    """A list<float> column as a float64 (rows, dims) array, rejecting nulls, ragged rows, NaN."""
    col = table[key].combine_chunks()
    if col.null_count or not (pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type)
                              or pa.types.is_large_list(col.type)):
        raise DataError(f"column must be a list of numbers without nulls, got {col.type}",
                        key=key, **where)
    lengths = np.asarray(col.value_lengths()) if len(col) else np.zeros(0, np.int64)
    if len(lengths) and (lengths != lengths[0]).any():
        raise DataError("rows have different lengths", key=key, **where)
    dims = int(lengths[0]) if len(lengths) else 0
    values = np.asarray(col.flatten().to_numpy(zero_copy_only=False), np.float64)
    out = values.reshape(len(col), dims)
    if not np.isfinite(out).all():
        bad = int(np.argwhere(~np.isfinite(out))[0, 0])
        raise DataError(f"non-finite value (NaN/inf) at frame {bad}", key=key, **where)
    return out


def _check_rows(table: pa.Table, ep: _EpisodeMeta, where: dict) -> np.ndarray:
    """Validate row count, frame_index and global index; return the row timestamps (float64)."""
    n = table.num_rows
    if n != ep.length:
        raise DataError(f"episode data has {n} rows but the episodes metadata says {ep.length}",
                        **where)
    if (np.asarray(table["episode_index"]) != ep.index).any():
        raise DataError(f"rows of another episode in this episode's file (expected "
                        f"episode_index {ep.index})", key="episode_index", **where)
    if not np.array_equal(np.asarray(table["frame_index"]), np.arange(n)):
        raise DataError("frame_index is not 0..length-1", key="frame_index", **where)
    if ep.rows and not np.array_equal(np.asarray(table["index"]), np.arange(*ep.rows)):
        raise DataError(f"global index does not span dataset_from_index..dataset_to_index "
                        f"{ep.rows}", key="index", **where)
    stamps = np.asarray(table["timestamp"], np.float64)
    if not np.isfinite(stamps).all() or (n > 1 and (np.diff(stamps) <= 0).any()):
        raise DataError("timestamps must be finite and increasing", key="timestamp", **where)
    return stamps


def _check_grid(stamps: np.ndarray, fps: float, tolerance: float, where: dict) -> None:
    """Row t's timestamp is frame_index / fps within the tolerance: a row between two frames
    would otherwise silently take a neighbouring frame."""
    off = np.abs(stamps - np.arange(len(stamps)) / fps)
    if len(off) and off.max() > tolerance:
        row = int(np.argmax(off > tolerance))
        raise DataError(f"frame {row} has timestamp {stamps[row]:.4f}s, {off[row] * fps:.2f} "
                        f"frames from frame_index / fps = {row / fps:.4f}s (more than "
                        f"source.lerobot_tolerance_s={tolerance})", key="timestamp", **where)


# ---------------------------------------------------------------------------------------------
# Video
# ---------------------------------------------------------------------------------------------

def _open(root: Path, video: _Video, episode: str):
    path = root / video.file
    if not path.is_file():
        raise DataError("missing video file", file=video.file, episode=episode)
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise DataError(f"unreadable video: {e}", file=video.file, episode=episode) from e
    if not container.streams.video:
        container.close()
        raise DataError("no video stream in file", file=video.file, episode=episode)
    return container


def _probe(root: Path, video: _Video, episode: str) -> tuple[int, float, tuple[int, int]]:
    """(frame count or 0 if unknown, duration in seconds, (H, W)) from the container header."""
    with _open(root, video, episode) as container:
        stream = container.streams.video[0]
        if stream.duration is not None:
            duration = float(stream.duration * stream.time_base)
        else:
            duration = (container.duration or 0) / av.time_base
        return int(stream.frames or 0), duration, (stream.height, stream.width)


def _check_video(root: Path, video: _Video, stamps: np.ndarray, fps: float, episode: str,
                 ) -> tuple[int, int]:
    """Frame counts and time spans must agree with the parquet rows; returns (H, W)."""
    frames, duration, size = _probe(root, video, episode)
    n, where = len(stamps), {"file": video.file, "episode": episode}
    if video.end is None:      # v2.1: the whole file is the episode
        if frames and frames != n:
            raise DataError(f"video has {frames} frames but the episode has {n} parquet rows",
                            **where)
        end = video.start + duration
    else:                      # v3.0: [from_timestamp, to_timestamp) of a shared file
        _check_span(video, n, fps, duration, where)
        end = video.end
    half = 0.5 / fps
    if n and (stamps[0] < -half or video.start + stamps[-1] > end - 1 / fps + half):
        raise DataError(f"row timestamps {stamps[0]:.3f}..{stamps[-1]:.3f}s fall outside the "
                        f"episode's video span ({video.start:.3f}-{end:.3f}s)", **where)
    return size


def _check_span(video: _Video, n: int, fps: float, duration: float, where: dict) -> None:
    held = (video.end - video.start) * fps
    if abs(held - n) > 0.5:
        raise DataError(f"video span {video.start:.3f}-{video.end:.3f}s holds {held:.1f} frames "
                        f"but the episode has {n} parquet rows", **where)
    if video.end > duration + 0.5 / fps:
        raise DataError(f"episode ends at {video.end:.3f}s but the video lasts {duration:.3f}s",
                        **where)


def _seek(container, stream, t: float) -> None:
    tb = stream.time_base
    container.seek(max(0, math.floor(t * tb.denominator / tb.numerator)), stream=stream,
                   backward=True, any_frame=False)


def _match(frames, want: np.ndarray, tol: float, where: dict) -> list[np.ndarray]:
    """Walk decoded frames in time order; keep the one within `tol` of each wanted time."""
    got: list[np.ndarray] = []
    for frame in frames:
        t = frame.time
        if t is None:
            raise DataError("decoded frame has no timestamp", **where)
        if len(got) < len(want) and want[len(got)] < t - tol:
            break
        img = None
        while len(got) < len(want) and abs(want[len(got)] - t) < tol:
            img = frame.to_ndarray(format="rgb24") if img is None else img
            got.append(img)
        if len(got) == len(want):
            return got
    missing = want[len(got)]
    raise DataError(f"no video frame at t={missing:.4f}s (frames do not match the parquet "
                    "timestamps: missing, truncated or shifted video)", **where)


def decode_at(root: Path, video: _Video, times: np.ndarray, fps: float,
              episode: str) -> np.ndarray:
    """Frames (len(times), H, W, 3) uint8 whose presentation times match `times` (seconds)."""
    where = {"file": video.file, "episode": episode}
    order = np.argsort(times, kind="stable")
    want = np.asarray(times, np.float64)[order]
    with _open(root, video, episode) as container:
        stream = container.streams.video[0]
        try:
            _seek(container, stream, want[0] - 0.5 / fps)
            got = _match(container.decode(stream), want, 0.5 / fps, where)
        except av.FFmpegError as e:
            raise DataError(f"corrupt video: {e}", **where) from e
    out = np.empty((len(got), *got[0].shape), np.uint8)
    out[order] = np.stack(got)
    return out


def _frame_loader(root: Path, ds: _Dataset, ep: _EpisodeMeta, stamps: np.ndarray,
                  cfg: SourceConfig, episode: str, size: tuple[int, int]):
    cameras = _camera_keys(cfg)

    def load_frames(view: str, rows: np.ndarray) -> np.ndarray:
        if view not in cameras:
            raise DataError(f"unknown view {view!r}; expected one of {sorted(cameras)}",
                            episode=episode)
        rows = np.asarray(rows, np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(stamps)):
            raise DataError(f"rows out of range 0..{len(stamps) - 1}", episode=episode,
                            file=ep.data_file)
        video = ep.videos[cameras[view]]
        if not len(rows):
            return np.zeros((0, *size, 3), np.uint8)
        frames = decode_at(root, video, video.start + stamps[rows], ds.fps, episode)
        return np.ascontiguousarray(frames[:, ::-1, ::-1]) if cfg.rotate_180 else frames

    return load_frames


# ---------------------------------------------------------------------------------------------
# One episode
# ---------------------------------------------------------------------------------------------

def load(root: Path, ref: EpisodeRef, cfg: SourceConfig) -> Episode:
    """The episode's parquet rows (states, actions, timestamps) and a lazy frame loader."""
    root = Path(root)
    ds = _dataset(root)
    _check_features(ds, cfg)
    ep = ds.episodes[_episode_index(ref, ds)]
    where = {"file": ep.data_file, "episode": ref.key}
    table = _rows(root, ep, cfg, where)
    stamps = _check_rows(table, ep, where)
    states = _matrix(table, cfg.lerobot_state_key, where)
    actions = _matrix(table, cfg.lerobot_action_key, where)
    cameras = _camera_keys(cfg)
    size = _check_video(root, ep.videos[cameras["front"]], stamps, ds.fps, ref.key)
    _check_video(root, ep.videos[cameras["wrist"]], stamps, ds.fps, ref.key)
    _check_grid(stamps, ds.fps, cfg.lerobot_tolerance_s, where)
    task_ids = table["task_index"].to_pylist()
    instruction = ds.tasks.get(task_ids[0], ep.task) if task_ids else ep.task
    return Episode(ref=ref, instruction=instruction, actions=actions, states=states,
                   obs_after_action=False,
                   load_frames=_frame_loader(root, ds, ep, stamps, cfg, ref.key, size),
                   image_size=size,
                   meta={"format": "lerobot", "version": ds.version, "fps": ds.fps,
                         "front_key": cfg.lerobot_front_key, "wrist_key": cfg.lerobot_wrist_key})
