"""LIBERO HDF5 reader (SPEC.md 1.1): one file per task, `data/demo_<i>` groups, both flavours.

    from stages import libero
    refs = libero.scan(root, cfg.source)         # every demo of every *.hdf5 under root, sorted
    ep = libero.load(root, refs[0], cfg.source)  # low-dim arrays now, images on demand
    front = ep.load_frames("front", np.arange(ep.ref.length))

Flavour per file (`source.flavour=auto`): the raw release puts attributes on `data`
(problem_info, env_args, ...) and records obs[t] AFTER actions[t]; regenerated no-op files have
no attributes and record obs[t] BEFORE actions[t]. Instruction (`source.instruction_source`):
problem_info's `language_instruction`, or the file name with `_demo.hdf5` and any
`..._SCENE<n>_` prefix dropped and `_` -> space. The model state (8-d) is
obs/ee_pos ++ obs/ee_ori ++ obs/gripper_states; `states` (the simulator state) is never read.
Images are stored bottom-row-first; `source.rotate_180` turns them upright once, in load_frames,
which reads only the rows asked for. Bad input (missing file or key, not HDF5 or truncated, wrong
shape or dtype, mismatched lengths, NaN/inf, empty demo) raises DataError naming file, episode and
key. Each thread keeps at most one file open (reopened when another file is asked for).
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import h5py
import numpy as np

from pipeline.config import SourceConfig
from pipeline.episode import Episode, EpisodeRef
from pipeline.errors import DataError
from pipeline.io import walk_files

SUFFIX = "_demo.hdf5"
DEMO_KEY = re.compile(r"demo_(\d+)")
SCENE_PREFIX = re.compile(r"^.*?SCENE\d+_")
ACTION_DIM = 7
STATE_KEYS = (("obs/ee_pos", 3), ("obs/ee_ori", 3), ("obs/gripper_states", 2))


# ---------------------------------------------------------------------------------------------
# Files and names
# ---------------------------------------------------------------------------------------------

def detect(root: Path) -> bool:
    return bool(_files(Path(root)))


def task_name(source: str) -> str:
    """File stem without `_demo` (`put_the_bowl_demo.hdf5` -> `put_the_bowl`)."""
    name = source.rsplit("/", 1)[-1]
    return name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name.rsplit(".", 1)[0]


def instruction_from_filename(source: str) -> str:
    """`KITCHEN_SCENE3_put_the_bowl_on_the_plate_demo.hdf5` -> `put the bowl on the plate`."""
    return SCENE_PREFIX.sub("", task_name(source), count=1).replace("_", " ").strip()


def _files(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in walk_files(root) if p.suffix == ".hdf5"]


class _OpenFile(threading.local):
    """This thread's one cached h5py file, keyed by path, mtime, size and process id."""

    key: tuple | None = None
    file: h5py.File | None = None


_CACHE = _OpenFile()


def close() -> None:
    """Close this thread's cached file (the next read reopens it)."""
    f, key = _CACHE.file, _CACHE.key
    _CACHE.file, _CACHE.key = None, None
    if f is not None and key[-1] == os.getpid():  # never close a handle inherited over fork
        f.close()


def _open(root: Path, source: str, episode: str | None = None) -> h5py.File:
    path = root / source
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError("LIBERO file not found", file=source, episode=episode) from None
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size, os.getpid())
    if _CACHE.key == key:
        return _CACHE.file
    close()
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"not a readable HDF5 file (truncated or corrupt?): {exc}",
                        file=source, episode=episode) from None
    _CACHE.file, _CACHE.key = f, key
    return f


# ---------------------------------------------------------------------------------------------
# Checked access
# ---------------------------------------------------------------------------------------------

def _get(group: h5py.Group, key: str, where: dict, kind: type) -> h5py.Group | h5py.Dataset:
    try:
        node = group[key]
    except KeyError:
        raise DataError(f"missing {'group' if kind is h5py.Group else 'dataset'} {key!r}",
                        key=key, **where) from None
    except OSError as exc:
        raise DataError(f"cannot read {key!r}: {exc}", key=key, **where) from None
    if not isinstance(node, kind):
        raise DataError(f"{key!r} is not a {kind.__name__}", key=key, **where)
    return node


def _data_group(f: h5py.File, source: str, episode: str | None = None) -> h5py.Group:
    return _get(f, "data", {"file": source, "episode": episode}, h5py.Group)


def _read(ds: h5py.Dataset, key: str, where: dict) -> np.ndarray:
    try:
        return ds[()]
    except OSError as exc:
        raise DataError(f"cannot read {key!r}: {exc}", key=key, **where) from None


def _matrix(demo: h5py.Group, key: str, cols: int, rows: int | None, where: dict) -> np.ndarray:
    """A finite (rows, cols) float array, read as float64."""
    ds = _get(demo, key, where, h5py.Dataset)
    want = f"({'T' if rows is None else rows}, {cols}) float"
    if ds.ndim != 2 or ds.shape[1] != cols or ds.dtype.kind != "f":
        raise DataError(f"expected a {want} array, got shape {ds.shape} dtype {ds.dtype}",
                        key=key, **where)
    if rows is not None and ds.shape[0] != rows:
        raise DataError(f"{ds.shape[0]} rows but actions has {rows}", key=key, **where)
    arr = _read(ds, key, where).astype(np.float64)
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise DataError(f"non-finite value (NaN or inf) at row {int(np.flatnonzero(bad)[0])}",
                        key=key, **where)
    return arr


def _image_shape(demo: h5py.Group, key: str, rows: int, where: dict) -> tuple[int, int]:
    ds = _get(demo, key, where, h5py.Dataset)
    if ds.ndim != 4 or ds.shape[3] != 3 or ds.dtype != np.uint8:
        raise DataError(f"expected (T, H, W, 3) uint8 images, got shape {ds.shape} dtype "
                        f"{ds.dtype}", key=key, **where)
    if ds.shape[0] != rows:
        raise DataError(f"{ds.shape[0]} image rows but actions has {rows}", key=key, **where)
    return int(ds.shape[1]), int(ds.shape[2])


def _camera_keys(cfg: SourceConfig) -> dict[str, str]:
    return {"front": f"obs/{cfg.front_camera}", "wrist": f"obs/{cfg.wrist_camera}"}


def _image_size(demo: h5py.Group, cfg: SourceConfig, rows: int, where: dict) -> tuple[int, int]:
    front, wrist = _camera_keys(cfg).values()
    size = _image_shape(demo, front, rows, where)
    if _image_shape(demo, wrist, rows, where) != size:
        raise DataError(f"wrist images differ in size from {front} {size}", key=wrist, **where)
    return size


# ---------------------------------------------------------------------------------------------
# Scan
# ---------------------------------------------------------------------------------------------

def _demo_number(key: str) -> int:
    return int(DEMO_KEY.fullmatch(key).group(1))


def _scan_file(root: Path, source: str) -> list[EpisodeRef]:
    data = _data_group(_open(root, source), source)
    keys = sorted((k for k in data if DEMO_KEY.fullmatch(k)), key=_demo_number)
    if not keys:
        raise DataError("no demo_<i> groups in 'data'", file=source, key="data")
    refs = []
    for key in keys:
        where = {"file": source, "episode": key}
        actions = _get(_get(data, key, where, h5py.Group), "actions", where, h5py.Dataset)
        if actions.ndim != 2:
            raise DataError(f"expected a (T, {ACTION_DIM}) float array, got shape "
                            f"{actions.shape}", key="actions", **where)
        refs.append(EpisodeRef(source=source, key=key, task=task_name(source),
                               length=int(actions.shape[0])))
    return refs


def scan(root: Path, cfg: SourceConfig) -> list[EpisodeRef]:
    """One EpisodeRef per demo, sorted by file then demo number (demo_2 before demo_10)."""
    root = Path(root)
    files = _files(root)
    if not files:
        raise DataError("no LIBERO *.hdf5 files found", file=str(root))
    return [ref for source in files for ref in _scan_file(root, source)]


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------

def _flavour(data: h5py.Group, cfg: SourceConfig) -> str:
    if cfg.flavour != "auto":
        return cfg.flavour
    return "raw" if len(data.attrs) else "regenerated"


def _attribute_instruction(data: h5py.Group, where: dict) -> str | None:
    raw = data.attrs.get("problem_info")
    if raw is None:
        return None
    try:
        info = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    except json.JSONDecodeError as exc:
        raise DataError(f"problem_info is not JSON: {exc}", key="data.attrs/problem_info",
                        **where) from None
    text = info.get("language_instruction") if isinstance(info, dict) else None
    return text.strip() if isinstance(text, str) and text.strip() else None


def _instruction(data: h5py.Group, cfg: SourceConfig, where: dict) -> tuple[str, str]:
    """(instruction, "attribute" | "filename") per `source.instruction_source`."""
    if cfg.instruction_source != "filename":
        text = _attribute_instruction(data, where)
        if text is not None:
            return text, "attribute"
        if cfg.instruction_source == "attribute":
            raise DataError("source.instruction_source=attribute but 'data' has no problem_info "
                            "language_instruction (regenerated files have none): set "
                            "source.instruction_source=auto or filename",
                            key="data.attrs/problem_info", **where)
    return instruction_from_filename(where["file"]), "filename"


def _rows_to_read(ds: h5py.Dataset, rows: np.ndarray, key: str, where: dict) -> np.ndarray:
    """ds[rows] reading each distinct row once, in increasing order, then reordered."""
    unique, inverse = np.unique(rows, return_inverse=True)
    contiguous = unique[-1] - unique[0] + 1 == len(unique)
    selection = slice(int(unique[0]), int(unique[-1]) + 1) if contiguous else unique
    try:
        block = ds[selection]
    except OSError as exc:
        raise DataError(f"cannot read image rows: {exc}", key=key, **where) from None
    return block[inverse.reshape(-1)]


def _frame_loader(root: Path, ref: EpisodeRef, cfg: SourceConfig, n: int,
                  size: tuple[int, int]):
    cameras = _camera_keys(cfg)
    where = {"file": ref.source, "episode": ref.key}

    def load_frames(view: str, rows: np.ndarray) -> np.ndarray:
        if view not in cameras:
            raise DataError(f"unknown view {view!r}; expected one of {sorted(cameras)}", **where)
        key = cameras[view]
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise DataError(f"rows out of range 0..{n - 1}", key=key, **where)
        if not rows.size:
            return np.zeros((0, *size, 3), np.uint8)
        demo = _get(_data_group(_open(root, ref.source, ref.key), ref.source, ref.key), ref.key,
                    where, h5py.Group)
        frames = _rows_to_read(_get(demo, key, where, h5py.Dataset), rows, key, where)
        return np.ascontiguousarray(frames[:, ::-1, ::-1]) if cfg.rotate_180 else frames

    return load_frames


def load(root: Path, ref: EpisodeRef, cfg: SourceConfig) -> Episode:
    """The demo's actions and 8-d states (checked), its instruction and a lazy frame loader."""
    root = Path(root)
    where = {"file": ref.source, "episode": ref.key}
    data = _data_group(_open(root, ref.source, ref.key), ref.source, ref.key)
    demo = _get(data, ref.key, where, h5py.Group)
    actions = _matrix(demo, "actions", ACTION_DIM, None, where)
    if not len(actions):
        raise DataError("empty demo (0 steps)", key="actions", **where)
    n = len(actions)
    states = np.concatenate([_matrix(demo, key, dim, n, where) for key, dim in STATE_KEYS], 1)
    size = _image_size(demo, cfg, n, where)
    flavour = _flavour(data, cfg)
    instruction, instruction_source = _instruction(data, cfg, where)
    return Episode(ref=ref, instruction=instruction, actions=actions, states=states,
                   obs_after_action=flavour == "raw",
                   load_frames=_frame_loader(root, ref, cfg, n, size), image_size=size,
                   meta={"format": "libero", "flavour": flavour,
                         "instruction_source": instruction_source})
