"""Trust nothing on disk, as a user meets it through the CLI: damaged cache entries are found and
rebuilt, exports share no bytes with the cache and survive concurrent exporters, fingerprints see
every file a reader opens, episode ids never collide, verify catches any manifest change.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_integrity.py -q
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cache import MANIFEST, output_problem
from sim.demo_data import write_demo_suite
from pipeline.episode import EpisodeRef
from pipeline.errors import DataError
from pipeline.io import dumps_json
from pipeline.workflow import export, plan, resolve_config
from shards.reader import ShardReader
from shards.verify import verify
from stages.source import check_unique_ids

SMALL = ("image.resolution=64", "image.vq_random_arch=small", "image.batch_size=16")


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("suite")
    write_demo_suite(root, tasks=2, demos=2, steps=24, seed=5)
    return root


def cli(*args: str, sets: tuple[str, ...] = SMALL):
    from pipeline.cli import app
    extra = [a for s in sets for a in ("--set", s)] if args[0] in ("tokenize", "plan") else []
    return CliRunner().invoke(app, [*args, *extra])


def tokenize(raw: Path, out: Path, *extra: str, sets: tuple[str, ...] = SMALL):
    result = cli("tokenize", "--raw", str(raw), "--recipe", "demo", "--out", str(out), *extra,
                 sets=sets)
    assert result.exit_code == 0, result.output
    return result


def files(path: Path, record: bool = True) -> dict[str, bytes]:
    """{relative path: bytes}; `record=False` leaves out stage.json (its timings differ)."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and (record or p.name != MANIFEST)}


def entry(out: Path, stage: str) -> Path:
    (path,) = [p for p in (out / "cache" / stage).iterdir() if not p.name.startswith(".")]
    return path


def flip(path: Path, offset: int | None = None, bit: int = 0) -> None:
    """Flip one bit in place (same size; the way a bad disk or a stray write damages a file)."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 1 << bit
    with open(path, "r+b") as f:
        f.write(data)


@pytest.fixture(scope="module")
def built(suite, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "out"
    tokenize(suite, out)
    return out


def fresh_copy(built: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(built, out, symlinks=True)
    return out


# ---------------------------------------------------------------------------------------------
# Cache hits are verified.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_damaged_cached_codes_are_rebuilt_not_reused(suite, built, tmp_path, damage):
    out = fresh_copy(built, tmp_path)
    store = entry(out, "pretokenize")
    codes = sorted((store / "codes").glob("*.npy"))[0]
    good = codes.read_bytes()
    flip(codes) if damage == "flip" else codes.unlink()
    result = tokenize(suite, out, sets=(*SMALL, "conv.chunk=4"))
    lines = [line for line in result.output.splitlines() if "cache damaged" in line]
    assert len(lines) == 1 and "pretokenize" in lines[0] and codes.name in lines[0], result.output
    assert codes.read_bytes() == good
    assert verify(out / "shards").problems == []


def test_damaged_cached_shard_is_rebuilt_before_export(suite, built, tmp_path):
    out = fresh_copy(built, tmp_path)
    shard = sorted(entry(out, "shards").glob("*.tar.gz"))[0]
    good = files(out / "shards", record=False)
    flip(shard)
    result = tokenize(suite, out)
    assert "cache damaged" in result.output and shard.name in result.output
    assert files(out / "shards", record=False) == good


def test_unchanged_files_are_not_rehashed(built, tmp_path, monkeypatch):
    out = fresh_copy(built, tmp_path)
    store = entry(out, "pretokenize")
    assert output_problem(store) is None         # the copy has new inodes: hashed once here
    hashed: list[str] = []
    import pipeline.cache as cache
    real = cache.sha256_file
    monkeypatch.setattr(cache, "sha256_file", lambda p: hashed.append(str(p)) or real(p))
    assert output_problem(store) is None and hashed == []
    os.utime(sorted((store / "codes").glob("*.npy"))[0])     # touched: hashed again
    assert output_problem(store) is None and len(hashed) == 1


def test_edited_stage_json_is_damage(built, tmp_path):
    out = fresh_copy(built, tmp_path)
    record = entry(out, "filter") / MANIFEST
    doc = json.loads(record.read_text())
    doc["counts"]["out"] += 1
    record.write_text(dumps_json(doc))
    assert "modified" in output_problem(record.parent)


def test_cache_verify_and_gc(suite, built, tmp_path):
    out = fresh_copy(built, tmp_path)
    assert cli("cache", "verify", "--out", str(out)).exit_code == 0
    codes = sorted((entry(out, "pretokenize") / "codes").glob("*.npy"))[0]
    flip(codes)
    result = cli("cache", "verify", "--out", str(out))
    assert result.exit_code == 1 and codes.name in result.output
    partial = out / "cache" / "filter" / ".partial-0123456789abcdef"
    partial.mkdir()
    (partial / "episodes.json").write_text("{")
    result = cli("cache", "gc", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert not partial.exists() and not codes.parent.parent.exists()
    assert cli("cache", "verify", "--out", str(out)).exit_code == 0


def test_cache_gc_keep_removes_entries_other_outputs_do_not_use(suite, built, tmp_path):
    out = fresh_copy(built, tmp_path)
    tokenize(suite, out, sets=(*SMALL, "conv.chunk=4"))          # a second shards entry
    assert len([p for p in (out / "cache" / "shards").iterdir() if not p.name.startswith(".")]) == 2
    result = cli("cache", "gc", "--out", str(out), "--keep", str(out))
    assert result.exit_code == 0, result.output
    assert len([p for p in (out / "cache" / "shards").iterdir() if not p.name.startswith(".")]) == 1
    assert all(s.hit for s in plan(resolve_config("demo", [*SMALL, "conv.chunk=4"]), suite, out))


# ---------------------------------------------------------------------------------------------
# Export: copies, atomic, concurrent.
# ---------------------------------------------------------------------------------------------

def test_export_shares_no_bytes_with_the_cache(suite, built, tmp_path):
    out = fresh_copy(built, tmp_path)
    tokenize(suite, out)
    good = files(out / "shards")
    for p in (out / "shards").iterdir():
        assert p.stat().st_nlink == 1, p
    flip(sorted((out / "shards").glob("*.tar.gz"))[0])          # damage the exported copy
    assert output_problem(entry(out, "shards")) is None          # the cache is untouched
    tokenize(suite, out)
    assert files(out / "shards") == good


def _export_many(src: str, dst: str, n: int, errors) -> None:
    try:
        for _ in range(n):
            export(Path(src), Path(dst))
    except Exception as exc:                     # reported to the test, not swallowed
        errors.put(f"{type(exc).__name__}: {exc}")


def concurrent_exports(built: Path, tmp_path: Path, procs: int, n: int) -> None:
    src, dst = entry(built, "shards"), tmp_path / "exported" / "shards"
    ctx = mp.get_context("fork")
    errors = ctx.Queue()
    workers = [ctx.Process(target=_export_many, args=(str(src), str(dst), n, errors))
               for _ in range(procs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors.empty(), errors.get()
    assert files(dst) == files(src)
    assert exported(dst) == EXPORTED


# hash record, exporters' lock, the one version, its readers' lock, the link to it
EXPORTED = [".hashed-shards.json", ".shards.lock", ".shards.v-*", ".shards.v-*.lock", "shards"]


def exported(dst: Path) -> list[str]:
    """The names beside an export, its version's tag replaced by `*`; `dst` links to it."""
    version = os.readlink(dst)
    assert (dst.parent / version).is_dir() and version.startswith(".shards.v-")
    return sorted(p.name.replace(version, ".shards.v-*") for p in dst.parent.iterdir())


def test_concurrent_exports_never_fail_or_leave_debris(built, tmp_path):
    concurrent_exports(built, tmp_path, procs=3, n=10)


def test_export_removes_debris_of_a_killed_exporter(built, tmp_path):
    dst = tmp_path / "x" / "shards"
    (dst.parent / ".shards.tmp-dead").mkdir(parents=True)
    (dst.parent / ".shards.old-123").mkdir()
    (dst.parent / ".shards.v-dead").mkdir()            # a version a killed exporter never linked
    export(entry(built, "shards"), dst)
    assert exported(dst) == [n for n in EXPORTED if n != ".hashed-shards.json"]
    version = os.readlink(dst)
    export(entry(built, "shards"), dst)                # unchanged: checked, not copied again
    assert exported(dst) == EXPORTED and os.readlink(dst) == version


def test_reader_refuses_a_set_reexported_while_it_reads(suite, built, tmp_path):
    out = fresh_copy(built, tmp_path)
    other = tmp_path / "other"
    tokenize(suite, other, sets=(*SMALL, "conv.chunk=4"))
    reader = ShardReader(out / "shards", batch_size=2, split="all", threads=1)
    export(other / "shards", out / "shards")            # a re-export with another chunk
    with pytest.raises(DataError, match="re-exported"):
        for _ in reader:
            pass
    reader.close()


# ---------------------------------------------------------------------------------------------
# Fingerprints see what is read; episode ids never collide.
# ---------------------------------------------------------------------------------------------

def test_a_file_under_a_dot_directory_is_in_the_fingerprint(suite, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(suite, raw)
    out = tmp_path / "out"
    tokenize(raw, out, "--until", "filter")
    first = sorted(raw.glob("*.hdf5"))[0]
    (raw / ".more").mkdir()
    shutil.copy(first, raw / ".more" / first.name)
    tokenize(raw, out, "--until", "filter")
    fresh = tmp_path / "fresh"
    tokenize(raw, fresh, "--until", "filter")
    warm = out / "cache" / "filter" / entry(fresh, "filter").name     # the warm cache agrees
    rows = json.loads((warm / "episodes.json").read_text())["episodes"]
    assert len(rows) == 6
    assert files(warm, record=False) == files(entry(fresh, "filter"), record=False)


def test_paths_that_used_to_collide_get_distinct_episode_ids(suite, tmp_path):
    raw = tmp_path / "raw"
    first = sorted(suite.glob("*.hdf5"))[0]
    (raw / "x").mkdir(parents=True)
    shutil.copy(first, raw / "x" / "y_demo.hdf5")
    shutil.copy(first, raw / "x__y_demo.hdf5")
    out = tmp_path / "o"
    result = cli("tokenize", "--raw", str(raw), "--recipe", "demo", "--out", str(out))
    assert result.exit_code == 0, result.output
    with h5py.File(first) as f:
        per_file = len(f["data"])
    rows = json.loads((entry(out, "filter") / "episodes.json").read_text())["episodes"]
    ids = [r["id"] for r in rows]
    assert len(ids) == 2 * per_file == len(set(ids))
    assert {i.rsplit("__", 1)[0] for i in ids} == {"x__y_demo", "x%5F%5Fy_demo"}
    splits = json.loads((out / "shards" / "manifest.json").read_text())["splits"]
    assert len(splits["episodes"]) == 2 * per_file


def test_episode_ids_are_injective():
    names = ["x/y_demo", "x__y_demo", "x_/y", "x/_y", "x%5F/y", "x___y", "x_%5F_y", "_x/y"]
    ids = [EpisodeRef(f"{n}.hdf5", "demo_0", "t", 1).episode_id for n in names]
    assert len(set(ids)) == len(ids)
    assert EpisodeRef("libero_10/put_it_demo.hdf5", "demo_3", "t", 1).episode_id == \
        "libero_10__put_it_demo__demo_3"        # ordinary names: the plain join, as before


def test_a_repeated_episode_is_an_error_naming_both_files():
    ref = EpisodeRef("x/y_demo.hdf5", "demo_0", "t", 1)
    with pytest.raises(DataError, match=r"x/y_demo.hdf5 \(demo_0\) and x/y_demo.hdf5 \(demo_0\)"):
        check_unique_ids([ref, EpisodeRef("x/y_demo.hdf5", "demo_0", "t", 2)])


def test_symlinked_directories_are_followed(suite, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(suite, elsewhere)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "linked").symlink_to(elsewhere, target_is_directory=True)
    out = tmp_path / "out"
    tokenize(raw, out, "--until", "filter")
    rows = json.loads((entry(out, "filter") / "episodes.json").read_text())["episodes"]
    assert len(rows) == 4 and all(r["id"].startswith("linked__") for r in rows)


def test_a_symlink_loop_is_an_error(suite, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(suite, raw)
    (raw / "again").symlink_to(raw, target_is_directory=True)
    result = cli("tokenize", "--raw", str(raw), "--recipe", "demo", "--out", str(tmp_path / "o"))
    assert result.exit_code == 1 and "loop" in result.output and "again" in result.output


# ---------------------------------------------------------------------------------------------
# verify checks everything the manifest claims.
# ---------------------------------------------------------------------------------------------

CHANGES = {
    "recipe": lambda m: m.__setitem__("recipe", "libero_10"),
    "vq.untrained": lambda m: m["vq"].__setitem__("untrained", not m["vq"]["untrained"]),
    "images.orientation": lambda m: m["images"].__setitem__("orientation", "upright"),
    "vocab.resolution": lambda m: m["vocab"].__setitem__("resolution", 512),
    "tokenizer.kind": lambda m: m["tokenizer"].__setitem__("kind", "chameleon"),
    "splits": lambda m: m["splits"]["counts"].__setitem__("val", 99),
    "config": lambda m: m["config"].__setitem__("split.seed", 7),
}


@pytest.mark.parametrize("field", sorted(CHANGES))
@pytest.mark.parametrize("with_stage_json", [True, False])
def test_verify_catches_a_changed_manifest_field(built, tmp_path, field, with_stage_json):
    shards = tmp_path / "shards"
    shutil.copytree(built / "shards", shards)
    if not with_stage_json:
        (shards / MANIFEST).unlink()
    doc = json.loads((shards / "manifest.json").read_text())
    CHANGES[field](doc)
    (shards / "manifest.json").write_text(dumps_json(doc))
    result = cli("verify", str(shards))
    assert result.exit_code == 1 and "manifest.json" in result.output, result.output


def test_verify_catches_an_edited_stage_json(built, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(built / "shards", shards)
    doc = json.loads((shards / MANIFEST).read_text())
    doc["config"]["conv.chunk"] = 3
    (shards / MANIFEST).write_text(dumps_json(doc))
    result = cli("verify", str(shards))
    assert result.exit_code == 1 and "stage.json" in result.output


def flip_sweep(built: Path, tmp_path: Path, flips: int, seed: int, name: str) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(built / "shards", shards)
    if name == "manifest.json":
        (shards / MANIFEST).unlink()        # the manifest's own digest must catch it alone
    path, rng = shards / name, random.Random(seed)
    good = path.read_bytes()
    assert verify(shards).problems == []
    for _ in range(flips):
        i, bit = rng.randrange(len(good)), rng.randrange(8)
        flip(path, i, bit)
        assert verify(shards).problems, f"flip of bit {bit} at byte {i} went unnoticed"
        path.write_bytes(good)


@pytest.mark.parametrize("name", ["manifest.json", MANIFEST])
def test_verify_catches_random_flips(built, tmp_path, name):
    flip_sweep(built, tmp_path, flips=15, seed=1, name=name)


# ---------------------------------------------------------------------------------------------
# LeRobot: no silent misalignment, no silently ignored episodes.
# ---------------------------------------------------------------------------------------------

def _lerobot(tmp_path: Path, version: str) -> Path:
    from lerobot_fixtures import write_lerobot_dataset
    return write_lerobot_dataset(tmp_path / "raw", version=version, episodes=3, frames=24,
                                 codec="av1" if version == "v3.0" else "h264")


def _lerobot_tokenize(raw: Path, out: Path):
    return cli("tokenize", "--raw", str(raw), "--recipe", "so100", "--out", str(out),
               "--until", "filter", sets=("source.rotate_180=false",))


def test_lerobot_non_square_frames_are_refused_without_a_fitting_rule(tmp_path):
    from lerobot_fixtures import write_lerobot_dataset
    raw = write_lerobot_dataset(tmp_path / "raw", episodes=1, frames=12, size=(48, 64))
    result = cli("tokenize", "--raw", str(raw), "--recipe", "base", "--out", str(tmp_path / "o"),
                 "--until", "filter", sets=("source.format=lerobot", "source.rotate_180=false"))
    assert result.exit_code == 1
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and "48 x 64 images are not square" in line
    assert "episode_000000" in line and "observation.images.front" in line
    assert "source.non_square=stretch" in line and "Traceback" not in result.output


def test_so100_stretches_non_square_frames_and_says_so_to_act(tmp_path):
    from lerobot_fixtures import write_lerobot_dataset
    raw = write_lerobot_dataset(tmp_path / "raw", episodes=2, frames=30, size=(48, 64))
    out = tmp_path / "o"
    result = cli("tokenize", "--raw", str(raw), "--recipe", "so100", "--out", str(out),
                 sets=(*SMALL, "image.resolution=64", "conv.chunk=4", "source.rotate_180=false"))
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["images"]["fit"] == "stretch"
    run = tmp_path / "run"
    trained = cli("train", "--shards", str(out / "shards"), "--out", str(run), "--preset", "test",
                  "--steps", "1", "--set", "batch_size=2", "--set", "eval_every=100")
    assert trained.exit_code == 0, trained.output
    from trainer.policy import Policy
    policy = Policy.from_checkpoint(run / "latest")
    frame = np.zeros((48, 64, 3), np.uint8)
    assert policy.act("pick", np.zeros(6), frame, frame).shape == (4, 6)


def _rewrite(path: Path, edit) -> None:
    import pyarrow.parquet as pq
    pq.write_table(edit(pq.read_table(path)), path)


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_lerobot_row_off_its_frame_time_is_an_error(tmp_path, version):
    import numpy as np
    import pyarrow as pa
    raw = _lerobot(tmp_path, version)
    data = sorted((raw / "data").rglob("*.parquet"))[0]

    def shift(table):
        stamps = np.asarray(table["timestamp"]).copy()
        stamps[10] += np.float32(0.6 / 30)                  # 0.6 frame late: between frames
        col = table.schema.get_field_index("timestamp")
        return table.set_column(col, "timestamp", pa.array(stamps))

    _rewrite(data, shift)
    result = _lerobot_tokenize(raw, tmp_path / "out")
    assert result.exit_code == 1, result.output
    line = result.output.strip().splitlines()[-1]
    assert "frame 10" in line and "timestamp" in line and data.name in line


def test_lerobot_v30_episode_missing_from_metadata_is_an_error(tmp_path):
    raw = _lerobot(tmp_path, "v3.0")
    meta = sorted((raw / "meta" / "episodes").rglob("*.parquet"))[0]
    _rewrite(meta, lambda t: t.take([0, 2]))      # forget episode 1 (it shares file-000 with 0)
    result = _lerobot_tokenize(raw, tmp_path / "out")
    assert result.exit_code == 1, result.output
    line = result.output.strip().splitlines()[-1]
    assert "episode_index 1" in line and "not in the episodes metadata" in line


def test_lerobot_v21_data_file_without_metadata_is_an_error(tmp_path):
    raw = _lerobot(tmp_path, "v2.1")
    rows = (raw / "meta" / "episodes.jsonl").read_text().splitlines()
    (raw / "meta" / "episodes.jsonl").write_text("\n".join(rows[:-1]) + "\n")
    result = _lerobot_tokenize(raw, tmp_path / "out")
    assert result.exit_code == 1 and "episode_000002.parquet" in result.output, result.output
