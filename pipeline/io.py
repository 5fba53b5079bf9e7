"""Atomic, deterministic file writes and hashing.

Every published file is written to a temporary name in the same directory, fsynced, then renamed,
so a reader never sees a half-written file and a killed run leaves only `.tmp-*` debris behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.errors import BadJSON, DataError

CHUNK = 1 << 20
_UMASK = os.umask(0)
os.umask(_UMASK)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside `path`; on clean exit fsync and rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; published files get the usual mode
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def dumps_json(obj: Any) -> str:
    """Canonical, deterministic JSON (sorted keys, 2-space indent, trailing newline)."""
    return json.dumps(obj, sort_keys=True, indent=2, default=_json_default) + "\n"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_bytes(path, dumps_json(obj).encode())


def read_json(path: str | os.PathLike) -> Any:
    """The parsed file; a file that is not JSON is a BadJSON error naming it."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadJSON(f"not valid JSON ({exc}); the file is damaged or not what was expected: "
                      "restore or regenerate it", file=str(path)) from None


def read_jsonl(path: str | os.PathLike, *, torn_tail: bool = False) -> list[Any]:
    """One parsed value per non-blank line. A line that is not JSON is a BadJSON error naming the
    file and line; with `torn_tail`, a damaged LAST line (a writer killed mid-append, as an
    interrupted run's metrics.jsonl) is dropped instead."""
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            if torn_tail and i == len(lines) - 1:
                break
            raise BadJSON(f"line {i + 1} is not valid JSON ({exc}); the file is damaged or not "
                          "what was expected: restore or regenerate it", file=str(path)) from None
    return rows


def npy_bytes(arr: np.ndarray) -> bytes:
    """Deterministic .npy bytes for an array."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def write_npy(path: str | os.PathLike, arr: np.ndarray) -> None:
    write_bytes(path, npy_bytes(arr))


def file_entry(path: Path, root: Path) -> dict[str, Any]:
    """{"path", "bytes", "sha256"} of a file, path relative to root (for manifests)."""
    return {"path": path.relative_to(root).as_posix(), "bytes": path.stat().st_size,
            "sha256": sha256_file(path)}


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """Deterministic .npz bytes (np.savez stamps the current time into the zip; this does not)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, npy_bytes(np.asarray(arrays[name])))
    return buf.getvalue()


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    write_bytes(path, npz_bytes(**arrays))


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def walk_files(root: Path) -> list[Path]:
    """Every file under `root`, sorted: dot-directories included, symlinked directories followed
    (a link leading back to a directory it is inside is an error naming it, as is a broken link)."""
    out: list[Path] = []

    def visit(d: Path, ancestors: frozenset[str]) -> None:
        real = os.path.realpath(d)
        if real in ancestors:
            raise DataError(f"symbolic link loop: {d} leads back to {real}; remove the link",
                            file=str(d))
        with os.scandir(d) as it:
            found = sorted(it, key=lambda e: e.name)
        for e in found:
            if e.is_dir():                            # follows symbolic links
                visit(Path(e.path), ancestors | {real})
            elif e.is_file():
                out.append(Path(e.path))
            elif e.is_symlink():
                raise DataError("broken symbolic link; fix or remove it", file=e.path)

    visit(Path(root), frozenset())
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())
