"""LIBERO HDF5 reader (stages/libero.py) on the synthetic suites and on deliberately broken files.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_libero_reader.py -q
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.config import SourceConfig
from sim.demo_data import demo_arrays, task_list, write_demo_suite
from pipeline.episode import EpisodeRef
from pipeline.errors import DataError
from stages import libero, source

CFG = SourceConfig()
RAW_FILE = task_list(1)[0].file_name("raw")


def stored(root: Path, ref: EpisodeRef, key: str) -> np.ndarray:
    with h5py.File(root / ref.source, "r") as f:
        return f[f"data/{ref.key}/{key}"][()]


def test_detect(demo_suite, tmp_path):
    assert libero.detect(demo_suite)
    assert source.format_name(demo_suite, CFG) == "libero"
    assert not libero.detect(tmp_path)


def test_scan_raw(demo_suite):
    refs = libero.scan(demo_suite, CFG)
    assert [(r.source, r.key) for r in refs] == [
        (f"{t}_demo.hdf5", f"demo_{i}") for t in ("put_the_green_block_on_the_white_plate",
                                                  "put_the_red_block_on_the_blue_plate")
        for i in range(3)]
    assert refs[0].task == "put_the_green_block_on_the_white_plate"
    assert [r.length for r in refs] == [len(stored(demo_suite, r, "actions")) for r in refs]


def test_scan_regenerated_keeps_gaps_and_sorts_numerically(demo_suite_regen, tmp_path):
    name = sorted(p.name for p in demo_suite_regen.glob("*.hdf5"))[0]
    shutil.copy(demo_suite_regen / name, tmp_path / name)
    with h5py.File(tmp_path / name, "r+") as f:
        f.copy(f["data/demo_0"], "data/demo_10")
    keys = [r.key for r in libero.scan(tmp_path, CFG)]
    numbers = [int(k.split("_")[1]) for k in keys]
    assert numbers == sorted(numbers) and numbers[-1] == 10 and 1 not in numbers
    assert libero.scan(tmp_path, CFG)[0].task.startswith("KITCHEN_SCENE1_put_the_")


def test_load_raw(demo_suite):
    ref = libero.scan(demo_suite, CFG)[0]
    ep = libero.load(demo_suite, ref, CFG)
    assert ep.instruction == "put the green block on the white plate"
    assert ep.meta["flavour"] == "raw" and ep.meta["instruction_source"] == "attribute"
    assert ep.obs_after_action
    want = np.concatenate([stored(demo_suite, ref, k) for k in
                           ("obs/ee_pos", "obs/ee_ori", "obs/gripper_states")], 1)
    assert ep.states.shape == (ref.length, 8) and ep.states.dtype == np.float64
    np.testing.assert_array_equal(ep.states, want)
    np.testing.assert_array_equal(ep.actions, stored(demo_suite, ref, "actions"))
    assert ep.image_size == (128, 128)


def test_load_regenerated(demo_suite_regen):
    ep = libero.load(demo_suite_regen, libero.scan(demo_suite_regen, CFG)[-1], CFG)
    assert ep.instruction == "put the green block on the white plate"
    assert ep.meta == {"format": "libero", "flavour": "regenerated",
                       "instruction_source": "filename"}
    assert not ep.obs_after_action


def test_instruction_and_flavour_options(demo_suite, demo_suite_regen):
    raw_ref = libero.scan(demo_suite, CFG)[0]
    by_name = libero.load(demo_suite, raw_ref, SourceConfig(instruction_source="filename"))
    assert (by_name.instruction, by_name.meta["instruction_source"]) == (
        "put the green block on the white plate", "filename")
    forced = libero.load(demo_suite, raw_ref, SourceConfig(flavour="regenerated"))
    assert not forced.obs_after_action and forced.meta["flavour"] == "regenerated"
    regen_ref = libero.scan(demo_suite_regen, CFG)[0]
    with pytest.raises(DataError, match="instruction_source=attribute.*problem_info"):
        libero.load(demo_suite_regen, regen_ref, SourceConfig(instruction_source="attribute"))


@pytest.mark.parametrize("name, instruction", [
    ("KITCHEN_SCENE3_put_the_black_bowl_on_the_plate_demo.hdf5", "put the black bowl on the plate"),
    ("libero_10/LIVING_ROOM_SCENE12_pick_up_the_book_demo.hdf5", "pick up the book"),
    ("pick_up_the_alphabet_soup_and_place_it_in_the_basket_demo.hdf5",
     "pick up the alphabet soup and place it in the basket"),
    ("open_the_drawer.hdf5", "open the drawer")])
def test_instruction_from_filename(name, instruction):
    assert libero.instruction_from_filename(name) == instruction


def test_frames_are_rotated_exactly_once(demo_suite):
    ref = next(r for r in libero.scan(demo_suite, CFG) if r.source == RAW_FILE and r.key == "demo_0")
    upright = demo_arrays(task_list(1)[0], 0, flavour="raw", size=128, seed=0).arrays
    rows = np.array([7, 2, 7, 0, ref.length - 1])
    ep = libero.load(demo_suite, ref, CFG)
    for view, key in (("front", "obs/agentview_rgb"), ("wrist", "obs/eye_in_hand_rgb")):
        frames = ep.load_frames(view, rows)
        assert frames.dtype == np.uint8 and frames.flags.c_contiguous
        np.testing.assert_array_equal(frames, upright[key][rows])
    unrotated = libero.load(demo_suite, ref, SourceConfig(rotate_180=False))
    np.testing.assert_array_equal(unrotated.load_frames("front", rows),
                                  stored(demo_suite, ref, "obs/agentview_rgb")[rows])
    assert ep.load_frames("front", np.arange(3, 6)).shape == (3, 128, 128, 3)
    assert ep.load_frames("wrist", np.array([], dtype=np.int64)).shape == (0, 128, 128, 3)


def test_frames_reject_bad_view_and_rows(demo_suite):
    ep = libero.load(demo_suite, libero.scan(demo_suite, CFG)[0], CFG)
    with pytest.raises(DataError, match="unknown view 'left'"):
        ep.load_frames("left", np.arange(2))
    with pytest.raises(DataError, match=r"out of range.*key=obs/agentview_rgb"):
        ep.load_frames("front", np.array([ep.ref.length]))


# ---------------------------------------------------------------------------------------------
# Bad input: every error names the file, the episode and the key
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A one-task, one-demo raw file with 32 px images, to copy and break."""
    root = tmp_path_factory.mktemp("tiny")
    return write_demo_suite(root, tasks=1, demos=1, size=32, steps=30)[0]


def replace(f: h5py.File, key: str, fn) -> None:
    path = f"data/demo_0/{key}"
    value = fn(f[path][()])
    del f[path]
    f.create_dataset(path, data=value)


def set_row(row: int, col: int, value: float):
    def fn(a: np.ndarray) -> np.ndarray:
        a[row, col] = value
        return a
    return fn


BROKEN = {
    "missing data group": (lambda f: f.move("data", "demos"), "data"),
    "missing demo": (lambda f: f.move("data/demo_0", "data/demo_1"), "demo_0"),
    "missing ee_pos": (lambda f: f.__delitem__("data/demo_0/obs/ee_pos"), "obs/ee_pos"),
    "missing camera": (lambda f: f.__delitem__("data/demo_0/obs/eye_in_hand_rgb"),
                       "obs/eye_in_hand_rgb"),
    "actions 6 columns": (lambda f: replace(f, "actions", lambda a: a[:, :6]), "actions"),
    "actions 1-d": (lambda f: replace(f, "actions", lambda a: a[:, 0]), "actions"),
    "actions integer": (lambda f: replace(f, "actions", lambda a: a.astype(np.int64)), "actions"),
    "images float": (lambda f: replace(f, "obs/agentview_rgb", lambda a: a.astype(np.float32)),
                     "obs/agentview_rgb"),
    "images gray": (lambda f: replace(f, "obs/agentview_rgb", lambda a: a[..., 0]),
                    "obs/agentview_rgb"),
    "state rows mismatch": (lambda f: replace(f, "obs/ee_ori", lambda a: a[:-1]), "obs/ee_ori"),
    "image rows mismatch": (lambda f: replace(f, "obs/eye_in_hand_rgb", lambda a: a[1:]),
                            "obs/eye_in_hand_rgb"),
    "nan in actions": (lambda f: replace(f, "actions", set_row(3, 0, np.nan)), "actions"),
    "inf in state": (lambda f: replace(f, "obs/gripper_states", set_row(2, 1, np.inf)),
                     "obs/gripper_states"),
    "empty demo": (lambda f: replace(f, "actions", lambda a: a[:0]), "actions"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_file_names_file_episode_and_key(tiny, tmp_path, case):
    breaker, key = BROKEN[case]
    shutil.copy(tiny, tmp_path / tiny.name)
    with h5py.File(tmp_path / tiny.name, "r+") as f:
        breaker(f)
    ref = EpisodeRef(source=tiny.name, key="demo_0", task="t", length=30)
    with pytest.raises(DataError) as info:
        libero.load(tmp_path, ref, CFG)
    msg = str(info.value)
    assert f"file={tiny.name}" in msg and "episode=demo_0" in msg and f"key={key}" in msg, msg


def write_truncated(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", ["missing", "not hdf5", "truncated"])
def test_unreadable_file_names_file_and_episode(tiny, tmp_path, damage):
    dst = tmp_path / tiny.name
    if damage == "not hdf5":
        dst.write_text("this is not an HDF5 file\n")
    elif damage == "truncated":
        write_truncated(tiny, dst)
    ref = EpisodeRef(source=tiny.name, key="demo_0", task="t", length=30)
    with pytest.raises(DataError, match=rf"file={tiny.name}, episode=demo_0"):
        libero.load(tmp_path, ref, CFG)


def test_scan_rejects_truncated_and_demo_less_files(tiny, tmp_path):
    write_truncated(tiny, tmp_path / tiny.name)
    with pytest.raises(DataError, match=rf"HDF5.*file={tiny.name}"):
        libero.scan(tmp_path, CFG)
    with h5py.File(tmp_path / tiny.name, "w") as f:
        f.create_group("data")
    with pytest.raises(DataError, match="no demo_<i> groups.*key=data"):
        libero.scan(tmp_path, CFG)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no LIBERO"):
        libero.scan(empty, CFG)
