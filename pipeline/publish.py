"""Publishing a cached output directory at a user-facing path, and holding a published version
while it is read.

    from pipeline.publish import export, hold
    export(cache_entry, Path("out/demo/shards"))     # out/demo/shards -> .shards.v-<tag>/ (a copy)
    with hold(Path("out/demo/shards")) as snapshot:   # this version stays until the block ends
        train_on(snapshot)

`export` copies the entry (reflinks where the file system has them, never hard links: damage to
the export cannot reach the cache) into a new sibling version directory `.<name>.v-<tag>`, then
points the symlink `<name>` at it in one rename, so `<name>` is always a complete export.
Exporters to one path take turns (a lock beside it). A reader that `hold`s a version keeps a
shared lock on `.<name>.v-<tag>.lock` until it is done; each export removes the versions nobody
holds (and the debris of killed exporters), so a run that started on one version reads that
version to the end even when the set is re-exported meanwhile. An export equal to the entry
(same stage.json, every file matching it: pipeline/cache.py) is left as it is.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.cache import MANIFEST, output_problem
from pipeline.errors import RynnError
from pipeline.io import fsync_dir
from pipeline.runner import key_lock

FICLONE = 0x40049409   # Linux ioctl: share extents copy-on-write (btrfs, xfs, ...)
VERSION_NAME = re.compile(r"\..+\.v-")   # `.shards.v-<tag>`: a version `export` made
HOLD_TRIES = 8         # a version removed between resolving the link and locking it: resolve again


def version_prefix(dst: Path) -> str:
    return f".{dst.name}.v-"


def lock_of(version: Path) -> Path:
    return version.with_name(version.name + ".lock")


def export(src: Path, dst: Path) -> None:
    """Publish the cached directory `src` at `dst` (a symlink to a complete new version)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with key_lock(dst.parent / f".{dst.name}.lock"):
        if not _same_export(src, dst):
            _publish(src, dst)
        prune(dst)


def _publish(src: Path, dst: Path) -> None:
    version = Path(tempfile.mkdtemp(prefix=version_prefix(dst), dir=dst.parent))
    link = dst.parent / f".{dst.name}.link-{os.getpid()}"
    try:
        shutil.copytree(src, version, copy_function=copy_file, dirs_exist_ok=True)
        lock_of(version).touch()
        link.unlink(missing_ok=True)
        os.symlink(version.name, link)
        if dst.is_dir() and not dst.is_symlink():        # an export made before versions existed
            os.replace(dst, dst.parent / f"{version_prefix(dst)}unversioned-{os.getpid()}")
        os.replace(link, dst)
        fsync_dir(dst.parent)
    except BaseException:
        link.unlink(missing_ok=True)
        shutil.rmtree(version, ignore_errors=True)
        lock_of(version).unlink(missing_ok=True)
        raise


def prune(dst: Path) -> None:
    """Remove every version of `dst` that it does not point at and no reader holds, and the
    debris of killed exporters (earlier releases' `.tmp-*` / `.old-*` included)."""
    current = os.readlink(dst) if dst.is_symlink() else None
    parent = dst.parent
    for debris in [*parent.glob(f".{dst.name}.tmp-*"), *parent.glob(f".{dst.name}.old-*"),
                   *parent.glob(f".{dst.name}.link-*")]:
        _remove(debris)
    for version in parent.glob(f"{version_prefix(dst)}*"):
        if version.name.endswith(".lock") or version.name == current:
            continue
        with open(lock_of(version), "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue                                 # a run still reads it
            _remove(version)
            lock_of(version).unlink(missing_ok=True)
    for lock in parent.glob(f"{version_prefix(dst)}*.lock"):   # locks whose version is gone
        if not lock.with_name(lock.name[: -len(".lock")]).exists():
            with open(lock, "a") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                lock.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def hold(path: Path) -> Iterator[Path]:
    """The directory behind `path`, kept from removal by exports until the block ends. A path
    that is not an exported version (a cache entry, a plain directory) is yielded as it is."""
    for _ in range(HOLD_TRIES):
        target = Path(os.path.realpath(path))
        lock = lock_of(target)
        try:
            fd = os.open(lock, os.O_RDONLY)
        except FileNotFoundError:
            if VERSION_NAME.match(target.name):
                continue                                 # removed meanwhile: resolve again
            yield target                                 # not an exported version
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            if target.is_dir() and _same_file(fd, lock):
                yield target
                return
        finally:
            os.close(fd)
    raise RynnError(f"{path}: the shard set kept changing while it was opened (is something "
                    "re-exporting it in a loop?)")


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _same_export(src: Path, dst: Path) -> bool:
    record = dst / MANIFEST
    return (record.is_file() and record.read_bytes() == (src / MANIFEST).read_bytes()
            and output_problem(dst) is None)


def copy_file(src: str, dst: str) -> None:
    """A copy of `src` at `dst`: a reflink where the file system supports one, else bytes."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
        except OSError:
            shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())
    shutil.copystat(src, dst)
