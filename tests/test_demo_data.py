"""The synthetic LIBERO suite (sim/demo_data.py), read back with plain h5py.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_demo_data.py -q
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.config import ConfigError
from sim.demo_data import MAX_STEP, WALL, demo_arrays, task_list, write_demo_suite
from pipeline.io import sha256_file

RAW_ATTRS = {"bddl_file_name", "env_args", "env_name", "macros_image_convention", "num_demos",
             "problem_info", "tag", "total"}


def expected_layout(t: int, s: int, size: int = 128) -> dict[str, tuple[tuple[int, ...], str]]:
    """SPEC.md 1.1: dataset path -> (shape, dtype) for a demo of t steps and state width s."""
    image = ((t, size, size, 3), "uint8")
    return {"actions": ((t, 7), "float64"), "states": ((t, s), "float64"),
            "robot_states": ((t, 9), "float64"), "rewards": ((t,), "uint8"),
            "dones": ((t,), "uint8"), "obs/agentview_rgb": image, "obs/eye_in_hand_rgb": image,
            "obs/ee_pos": ((t, 3), "float64"), "obs/ee_ori": ((t, 3), "float64"),
            "obs/ee_states": ((t, 6), "float64"), "obs/gripper_states": ((t, 2), "float64"),
            "obs/joint_states": ((t, 7), "float64")}


def datasets(group: h5py.Group) -> dict[str, h5py.Dataset]:
    out: dict[str, h5py.Dataset] = {}
    group.visititems(lambda name, node: out.update({name: node})
                     if isinstance(node, h5py.Dataset) else None)
    return out


def demos(root: Path):
    """(file path, demo key, {dataset path: array}) for every demo of a suite."""
    for path in sorted(root.glob("*.hdf5")):
        with h5py.File(path, "r") as f:
            for key in f["data"]:
                yield path, key, {k: v[()] for k, v in datasets(f["data"][key]).items()}


def test_raw_files_have_exactly_the_libero_layout(demo_suite):
    files = sorted(demo_suite.glob("*.hdf5"))
    assert [p.name for p in files] == ["put_the_green_block_on_the_white_plate_demo.hdf5",
                                       "put_the_red_block_on_the_blue_plate_demo.hdf5"]
    for path in files:
        with h5py.File(path, "r") as f:
            data = f["data"]
            assert list(data) == ["demo_0", "demo_1", "demo_2"]
            total = 0
            for key in data:
                ds = datasets(data[key])
                t, s = ds["states"].shape
                assert s > 8
                assert {k: (v.shape, str(v.dtype)) for k, v in ds.items()} == expected_layout(t, s)
                assert data[key].attrs["num_samples"] == t
                assert data[key].attrs["init_state"].shape == (s,)
                total += t
            assert set(data.attrs) == RAW_ATTRS
            assert data.attrs["tag"] == "libero-v1"
            assert data.attrs["num_demos"] == 3 and data.attrs["total"] == total
            info = json.loads(data.attrs["problem_info"])
            assert info["language_instruction"].replace(" ", "_") + "_demo.hdf5" == path.name
            assert json.loads(data.attrs["env_args"])["env_kwargs"]["camera_heights"] == 128


def test_regenerated_files_have_no_attributes_and_gaps(demo_suite_regen):
    files = sorted(demo_suite_regen.glob("*.hdf5"))
    assert len(files) == 2
    for path in files:
        assert re.fullmatch(r"[A-Z_]+_SCENE\d+_put_the_\w+_demo\.hdf5", path.name)
        with h5py.File(path, "r") as f:
            attrs = [name for name, node in [("/", f), *f["data"].items()] if node.attrs]
            f.visititems(lambda name, node: attrs.append(name) if node.attrs else None)
            assert attrs == []
            numbers = sorted(int(k.split("_")[1]) for k in f["data"])
            assert len(numbers) == 3 and numbers[0] == 0 and 1 not in numbers
            for key in f["data"]:
                ds = datasets(f["data"][key])
                t, s = ds["states"].shape
                assert {k: (v.shape, str(v.dtype)) for k, v in ds.items()} == expected_layout(t, s)


def test_state_width_depends_on_the_scene(demo_suite):
    widths = {p.name: s for p, _, a in demos(demo_suite) for s in [a["states"].shape[1]]}
    assert len(set(widths.values())) == 2


def test_actions_are_libero_commands(demo_suite, demo_suite_regen):
    for root, idle_expected in ((demo_suite, True), (demo_suite_regen, False)):
        for _, _, arrays in demos(root):
            a = arrays["actions"]
            assert np.abs(a[:, :6]).max() <= 1.0
            assert set(np.unique(a[:, 6])) == {-1.0, 1.0}
            still = np.linalg.norm(a[:, :6], axis=1) < 1e-4
            same_grip = np.concatenate([[True], a[1:, 6] == a[:-1, 6]])
            assert (still & same_grip).any() == idle_expected
            assert (still == (np.abs(a[:, :6]).max(axis=1) == 0)).all()  # idle = exactly zero


def test_positions_integrate_actions_with_flavour_timing(demo_suite, demo_suite_regen):
    for _, _, arrays in demos(demo_suite):  # raw: obs[t] after actions[t]
        moved = np.diff(arrays["obs/ee_pos"], axis=0)
        np.testing.assert_allclose(moved, arrays["actions"][1:, :3] * MAX_STEP, atol=1e-12)
    for _, _, arrays in demos(demo_suite_regen):  # regenerated: obs[t] before actions[t]
        moved = np.diff(arrays["obs/ee_pos"], axis=0)
        np.testing.assert_allclose(moved, arrays["actions"][:-1, :3] * MAX_STEP, atol=1e-12)


def test_observations_are_consistent(demo_suite):
    for _, _, arrays in demos(demo_suite):
        pos, ori, grip = arrays["obs/ee_pos"], arrays["obs/ee_ori"], arrays["obs/gripper_states"]
        np.testing.assert_array_equal(arrays["obs/ee_states"], np.concatenate([pos, ori], 1))
        np.testing.assert_array_equal(grip[:, 1], -grip[:, 0])
        np.testing.assert_array_equal(arrays["robot_states"][:, :5], np.concatenate([grip, pos], 1))
        assert np.abs(np.linalg.norm(ori, axis=1) - np.pi).max() < 0.3  # gripper points down
        assert grip[:, 0].min() < 0.025 < 0.039 < grip[:, 0].max()     # it closed and opened


def test_every_demo_puts_the_block_on_the_plate(demo_suite, demo_suite_regen):
    for root in (demo_suite, demo_suite_regen):
        for _, _, arrays in demos(root):
            assert arrays["rewards"][-1] == 1 and arrays["rewards"].sum() == 1
            assert arrays["dones"][-1] == 1 and arrays["dones"].sum() == 1


def test_images_are_stored_bottom_row_first(demo_suite):
    task = task_list(1)[0]
    path = demo_suite / task.file_name("raw")
    upright = demo_arrays(task, 0, flavour="raw", size=128, seed=0).arrays
    with h5py.File(path, "r") as f:
        demo = f["data/demo_0"]
        for key in ("obs/agentview_rgb", "obs/eye_in_hand_rgb"):
            np.testing.assert_array_equal(demo[key][()], upright[key][:, ::-1, ::-1])
        stored = demo["obs/agentview_rgb"][()]
    assert (stored[:, -1] == WALL).all()      # the wall, at the top of the scene, is stored last
    assert not (stored[:, 0] == WALL).all()
    assert not np.array_equal(stored[0], stored[-1])  # the scene moves


def test_same_seed_gives_identical_bytes(tmp_path):
    kwargs = {"size": 32, "tasks": 2, "demos": 2, "steps": 30}
    first = write_demo_suite(tmp_path / "a", seed=3, **kwargs)
    second = write_demo_suite(tmp_path / "b", seed=3, **kwargs)
    other = write_demo_suite(tmp_path / "c", seed=4, **kwargs)
    assert [sha256_file(p) for p in first] == [sha256_file(p) for p in second]
    assert [sha256_file(p) for p in first] != [sha256_file(p) for p in other]
    assert not list((tmp_path / "a").glob(".tmp-*"))
    with h5py.File(first[0], "r") as f:
        assert all(f[f"data/demo_{i}/actions"].shape == (30, 7) for i in range(2))


@pytest.mark.parametrize("kwargs, option", [({"flavour": "noops"}, "--flavour"),
                                            ({"size": 8}, "--size"), ({"tasks": 0}, "--tasks"),
                                            ({"demos": 0}, "--demos"), ({"steps": 5}, "--steps")])
def test_bad_arguments_name_the_option(tmp_path, kwargs, option):
    with pytest.raises(ConfigError, match=option):
        write_demo_suite(tmp_path, **kwargs)
    assert not list(tmp_path.iterdir())
