"""compat=published: the published split rule, image fitting, SO100 world-model samples and static
rule, with hand-built expectations; the default refusing non-square and degenerate LIBERO frames.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_compat.py -q
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.actions import is_published_static, is_static_chunk
from pipeline.config import ConvConfig, apply_overrides, recipe, select
from pipeline.errors import DataError
from pipeline.splits import TRAIN, VAL_IND, VAL_OOD, published_splits
from shards import vocab
from shards.conversation import Codec, Rules, episode_samples, episode_tokens
from shards.tokenizer import fallback_tokenizer
from shards import fit

TOK = fallback_tokenizer(warn=False)


# ---------------------------------------------------------------------------------------------
# The switch and the default's keys.
# ---------------------------------------------------------------------------------------------

def test_switch_is_a_recipe_field_left_out_of_keys_at_its_default():
    cfg = recipe("demo")
    assert cfg.compat == "none"
    assert "compat" not in select(cfg, ("compat", "conv.*"))          # default keys unchanged
    on = apply_overrides(cfg, ["compat=published"])
    assert select(on, ("compat",)) == {"compat": "published"}
    assert "image.crop_seed" in select(apply_overrides(on, ["image.crop_seed=3"]),
                                       ("image.crop_seed",))


# ---------------------------------------------------------------------------------------------
# Splits: 10 tasks x 50 trajectories.
# ---------------------------------------------------------------------------------------------

def test_published_split_on_ten_tasks_of_fifty():
    tasks = [f"task_{c}" for c in "jihgfedcba"]                         # given out of order
    episodes = [(t, f"{t}__demo_{n}", f"demo_{n}") for t in tasks for n in range(50)]
    split = published_splits(episodes)
    # ceil(0.9 * 10) = 9 tasks in distribution: task_a..task_i; task_j is val_ood whole.
    assert {split[f"task_j__demo_{n}"] for n in range(50)} == {VAL_OOD}
    # ceil(0.9 * 50) = 45 train. trj_ names as strings: trj_0, trj_1, trj_10..trj_19, trj_2,
    # trj_20..trj_29, trj_3, trj_30..trj_39, trj_4, trj_40..trj_49, trj_5, trj_6, trj_7, trj_8,
    # trj_9: the 45th is trj_49, so val_ind = trj_5 .. trj_9.
    val_ind = sorted(int(e.rsplit("_", 1)[1]) for e, s in split.items()
                     if s == VAL_IND and e.startswith("task_a"))
    assert val_ind == [5, 6, 7, 8, 9]
    assert sum(s == VAL_IND for s in split.values()) == 9 * 5
    assert sum(s == TRAIN for s in split.values()) == 9 * 45


def test_string_order_puts_trj_10_before_trj_2():
    # 11 trajectories: ceil(9.9) = 10 train; string order trj_0, trj_1, trj_10, trj_2 .. trj_9.
    split = published_splits([("t", f"e{n}", f"demo_{n}") for n in range(11)])
    assert [n for n in range(11) if split[f"e{n}"] == VAL_IND] == [9]
    assert split["e10"] == TRAIN


# ---------------------------------------------------------------------------------------------
# Image fitting.
# ---------------------------------------------------------------------------------------------

# (width, height, target) -> (crop w, crop h, height grid token, width grid token). Hand-derived
# from the published list (wp walks down from (target/32)^2, hp rises while (hp+1) wp fits):
# 640x480 is 4:3; at 128 (16 patches) (4, 3) is visited (wp 5 -> hp 3 -> wp 4 with hp 3): exact.
# At 256 (64 patches) (8, 6) is never visited (hp is 7 when wp reaches 8); (9, 7) matches best
# (0.45 vs 0.467 -> 0.964). At 512 (18, 14) is visited (hp 13 -> 14 at wp 18): 0.9 vs 0.933.
CROPS = [
    (640, 480, 128, 128, 96, 8804 + 3, 8804 + 4),
    (480, 640, 128, 96, 128, 8804 + 4, 8804 + 3),
    (300, 300, 128, 128, 128, 8808, 8808),
    (640, 480, 256, 288, 224, 8811, 8813),
    (480, 640, 256, 224, 288, 8813, 8811),
    (300, 300, 256, 256, 256, 8812, 8812),
    (640, 480, 512, 576, 448, 8804 + 14, 8804 + 18),
    (480, 640, 512, 448, 576, 8804 + 18, 8804 + 14),
    (300, 300, 512, 512, 512, 8820, 8820),
]


@pytest.mark.parametrize("w,h,target,cw,ch,grid_h,grid_w", CROPS)
def test_crop_size_and_grid_tokens(w, h, target, cw, ch, grid_h, grid_w):
    assert fit.crop_size(w, h, target) == (cw, ch)
    assert (vocab.grid_token(ch), vocab.grid_token(cw)) == (grid_h, grid_w)
    rows, cols = fit.wm_grid(h, w, target)
    assert (rows, cols) == (ch // 16, cw // 16)
    block = vocab.block_grid(grid_h, grid_w)
    assert block == (rows, cols)


def test_world_model_fit_halves_resizes_and_crops_deterministically():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    a = fit.fit_wm(img, 256, (0, "ep", 3, "front"))
    assert a.shape == (224, 288, 3)
    assert np.array_equal(a, fit.fit_wm(img, 256, (0, "ep", 3, "front")))   # reproducible
    # 640x480 -> BOX 320x240 -> BICUBIC x 224/240 -> 299x224 -> crop 288 wide at an offset 0..11
    from PIL import Image
    half = Image.fromarray(img).resize((320, 240), Image.BOX)
    big = np.asarray(half.resize((299, 224), Image.BICUBIC))
    left, top = fit.offset((299 - 288, 0), (0, "ep", 3, "front"))
    assert top == 0 and 0 <= left <= 11
    assert np.array_equal(a, big[:, left:left + 288])
    lefts = {fit.offset((11, 0), (0, "ep", row, "front"))[0] for row in range(200)}
    assert lefts == set(range(12))                                        # the whole range


def test_vla_fit_is_square_and_identity_at_256():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    assert fit.fit_vla(img, 256).shape == (256, 256, 3)
    assert fit.fit_vla(img, 128).shape == (128, 128, 3)
    square = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    assert np.array_equal(fit.fit_vla(square, 256), square)
    assert np.array_equal(fit.fit_wm(square, 256, ("k",)), square)
    assert np.array_equal(fit.fit_vla(square, 128), fit.fit_wm(square, 128, ("k",)))


# ---------------------------------------------------------------------------------------------
# SO100 world-model samples and the static rule.
# ---------------------------------------------------------------------------------------------

D = 6
CODEC = Codec(state_min=np.full(D, -50.0), state_max=np.full(D, 50.0),
              action_min=np.full(D, -50.0), action_max=np.full(D, 50.0),
              relative_dims=(0, 1, 2, 3, 4), relative_dtype=np.float32)


def test_static_rule_keeps_a_moving_gripper_with_a_still_arm():
    actions = np.zeros((3, D))
    actions[:, 5] = [0.0, 10.0, 20.0]          # the gripper moves, the arm is still
    chunk = actions.copy()                      # relative arm = 0, gripper absolute
    assert not is_published_static(chunk)
    assert is_published_static(np.zeros((3, D)))
    # The project's threshold rule on the same chunk (state gripper 0): not static either;
    # with a still gripper held at 20 the project's rule calls it static, the published does not.
    held = np.zeros((3, D))
    held[:, 5] = 20.0
    st = np.zeros((3, D))
    st[:, 5] = 20.0
    assert is_static_chunk(held, st, 0, 3, 1e-3)
    assert not is_published_static(held)


def test_per_camera_world_model_samples_over_valid_frames():
    steps, k = 6, 2
    codes = np.stack([np.full((2, 4), 10 * t + v) for t in range(steps)
                      for v in range(2)]).reshape(steps, 2, 2, 4)     # world model: 2 x 4
    states = np.zeros((steps, D))
    actions = np.zeros((steps, D))
    actions[3:, 0] = 5.0                      # frames 0, 1 have static chunks (a_0..a_2 zero)
    ep = episode_tokens("ep", "pick", codes[:, :, :, :2], actions, states, TOK, CODEC,
                        wm_codes=codes)                                # VLA: square 2 x 2
    conv = ConvConfig(history=1, chunk=k, drop_static_chunks=True)
    drops: Counter = Counter()
    rules = Rules(published_static=True, per_camera_wm=True)
    samples = list(episode_samples(ep, CODEC, conv, drops, rules))
    vla = [s for s in samples if s.kind == "vla"]
    wm = [s for s in samples if s.kind == "wm"]
    # chunks start at 0..4; a_0..a_2 are zero: chunks at 0 and 1 static; valid frames 2, 3, 4
    assert [s.step for s in vla] == [2, 3, 4] and drops[("vla", "static_chunk")] == 2
    # valid pairs (2,3), (3,4), each front then wrist: steps 0..3 renumbered
    assert [s.step for s in wm] == [0, 1, 2, 3]
    code_id = TOK.image_code_to_id
    first = wm[0].tokens
    blocks = np.flatnonzero(first == vocab.IMAGE_START)
    assert len(blocks) == 2                                      # one image in, one out
    # the front-only sample: [front_2] + a_2 -> [front_3]; a 2 x 4 grid (non-square)
    assert first[blocks[0] + 1] == vocab.IMAGE_GRID_BASE + 1     # 2 rows of codes = 32 px
    assert first[blocks[0] + 2] == vocab.IMAGE_GRID_BASE + 2     # 4 cols = 64 px
    assert len(first) == 1 + len(ep.wm_prompt) + 2 * (3 + 2 * 5 + 1) + (D + 2) + 2
    assert first[blocks[0] + 3] == code_id[20]
    assert first[blocks[1] + 3] == code_id[30]
    assert wm[1].tokens[blocks[0] + 3] == code_id[21]           # the wrist sample
    assert wm[1].tokens[blocks[1] + 3] == code_id[31]
    action = first[np.flatnonzero(first == vocab.ACTION_START)[0] + 1:][:D] - vocab.ACTION_BIN_BASE
    assert action.tolist() == CODEC_bins(actions[2]).tolist()


def CODEC_bins(row: np.ndarray) -> np.ndarray:
    from shards.bins import to_bins
    return to_bins(CODEC.action_norm(row[None]), 256)[0]


# ---------------------------------------------------------------------------------------------
# The default refuses non-square and degenerate LIBERO frames.
# ---------------------------------------------------------------------------------------------

def _libero_file(path: Path, h: int, w: int) -> Path:
    with h5py.File(path, "w") as f:
        demo = f.create_group("data/demo_0")
        demo["actions"] = np.tile(np.linspace(-0.5, 0.5, 7), (4, 1))
        for key, dim in (("ee_pos", 3), ("ee_ori", 3), ("gripper_states", 2)):
            demo[f"obs/{key}"] = np.zeros((4, dim))
        for key in ("agentview_rgb", "eye_in_hand_rgb"):
            demo[f"obs/{key}"] = np.zeros((4, h, w, 3), np.uint8)
    return path


@pytest.mark.parametrize("h,w,what", [(96, 128, "not square"), (2, 2, "degenerate")])
def test_default_refuses_non_square_and_degenerate_frames(tmp_path, h, w, what):
    from stages import filter as filter_stage
    from stages import libero
    _libero_file(tmp_path / "pick_demo.hdf5", h, w)
    cfg = recipe("demo")
    ref = libero.scan(tmp_path, cfg.source)[0]
    ep = libero.load(tmp_path, ref, cfg.source)
    with pytest.raises(DataError) as err:
        filter_stage.check_image_size(ep, cfg, "libero")
    msg = str(err.value)
    assert what in msg and "pick_demo.hdf5" in msg and "demo_0" in msg
    assert "obs/agentview_rgb" in msg and "\n" not in msg
    published = apply_overrides(cfg, ["compat=published"])
    if what == "not square":
        filter_stage.check_image_size(ep, published, "libero")   # the published fitting takes it


# ---------------------------------------------------------------------------------------------
# LeRobot: no no-op filter; float32 relative arithmetic.
# ---------------------------------------------------------------------------------------------

def test_lerobot_gets_no_noop_filter_under_compat(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from pipeline.episode import Episode, EpisodeRef
    from stages import filter as filter_stage
    actions = np.zeros((5, 6))                       # every step a no-op by the project's rule
    actions[2] = 1.0
    ref = EpisodeRef(source="data/chunk-000/episode_000000.parquet", key="episode_000000",
                     task="pick", length=5)
    ep = Episode(ref=ref, instruction="pick", actions=actions, states=np.zeros((5, 6)),
                 obs_after_action=False, load_frames=lambda v, r: None, image_size=(480, 640))
    monkeypatch.setattr(filter_stage.source, "load", lambda root, r, cfg: ep)
    kept = {}
    for compat in ("none", "published"):
        cfg = apply_overrides(recipe("so100"), [f"compat={compat}"])
        ctx = SimpleNamespace(cfg=cfg, out=tmp_path / compat)
        kept[compat] = filter_stage.process(tmp_path, ref, ctx, "lerobot")["n_kept"]
    # project rule: steps 0, 1 dropped (nothing kept yet, norm 0), 2 kept (moves), 3 kept (its
    # gripper 0 differs from the kept gripper 1), 4 dropped (still, gripper as step 3)
    assert kept == {"none": 2, "published": 5}


def test_relative_actions_in_float32_under_compat():
    from pipeline.actions import relative_chunk
    actions = np.array([[0.1 + 1e-9, 0.7]])
    states = np.array([[0.1, 0.0]])
    f64 = relative_chunk(actions, states, 0, 1, (0,))
    f32 = relative_chunk(actions, states, 0, 1, (0,), np.float32)
    assert f64[0, 0] == pytest.approx(1e-9, rel=1e-6)
    assert f32[0, 0] == float(np.float32(0.1 + 1e-9) - np.float32(0.1)) == 0.0
    assert f32[0, 1] == float(np.float32(0.7))                # absolute dims pass through float32
