"""Policy and world model on a tiny pipeline-built shard set: parity, both action modes, refusals.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_policy.py -q

The shard set comes from the real pipeline (`write_demo_suite` + `workflow.tokenize`, 64 px, small
random VQ-GAN, K=3). The network is the trainer's own RynnModel (`test` preset), saved by the
trainer's own checkpoint `save`; its output projection is fitted on one VLA sample so greedy
decoding reproduces that sample's well-formed response.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from sim.demo_data import write_demo_suite
from pipeline.io import load_npz, read_json
from pipeline.workflow import resolve_config, tokenize
from shards import vocab
from shards.shard_set import read_shard
from shards.tokenizer import TokenizerMismatch, load_tokenizer_from_record
from shards.vq import VQMismatch, load_vq_from_record
from shards.bins import from_bins, unnormalize
from trainer import engine
from trainer import policy as pol
from trainer import card as card_mod
from trainer.card import MalformedActions, PolicyError
from shards.conversation import parse_action_blocks
from trainer.engine import attention_rule
from trainer.policy import Policy
from trainer.checkpoint import processor_card, save
from trainer.config import PRESETS, resolve_train_config
from trainer.model import RynnModel
from trainer.train import build_optimizer
from trainer.world_model import imagine, rollout

K, RES = 3, 64
OVERRIDES = [f"image.resolution={RES}", "image.vq_random_arch=small", f"conv.chunk={K}",
             "image.device=cpu"]
_BUILT: dict[str, dict] = {}


# ---------------------------------------------------------------------------------------------
# Builders shared with test_evaluate.py.
# ---------------------------------------------------------------------------------------------

def build_pipeline(root: Path) -> dict:
    """Demo suite -> shards (cached per process). Returns raw dir, stage dirs and shards dir."""
    if "pipe" not in _BUILT:
        raw = root / "raw"
        write_demo_suite(raw, flavour="raw", size=128, tasks=2, demos=2, seed=0, steps=24)
        done = tokenize(resolve_config("demo", OVERRIDES), raw, root / "out", quiet=True)
        _BUILT["pipe"] = {"raw": raw, "stages": done, "shards": root / "out" / "shards"}
    return _BUILT["pipe"]


def fit_output(model: RynnModel, sample, steps: int = 150) -> None:
    """Fit only the output projection so argmax reproduces the sample's response."""
    ids = np.asarray(sample.tokens, np.int64)
    start = int(sample.targets[0][0])
    mask = engine.additive_mask(torch.from_numpy(attention_rule(ids)), torch.float32)
    with torch.no_grad():
        hidden = model.backbone(input_ids=torch.from_numpy(ids)[None],
                                attention_mask=mask).last_hidden_state[0, start - 1:-1]
    target = torch.from_numpy(ids[start:])
    weight = model.lm_head.weight
    opt = torch.optim.Adam([weight], lr=5e-2)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(hidden @ weight.T, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    weight.requires_grad_(False)
    assert ((hidden @ weight.T).argmax(-1) == target).all(), "stand-in output fit failed"


def first_vla(pipe: dict, split: str = "val"):
    return read_shard(pipe["shards"] / "vla-000000.tar.gz", split)[0]


def build_checkpoint(root: Path, monkeypatch=None) -> tuple[Path, dict]:
    """A real checkpoint written by the trainer's own `save`: the `test` preset RynnModel with
    its output projection fitted to one shard sample, so greedy decoding reproduces it."""
    pipe = build_pipeline(root)
    run = root / "run"
    if "model" not in _BUILT:
        torch.manual_seed(0)
        _BUILT["model"] = RynnModel(PRESETS["test"], chunk=K, action_dim=7).eval()
        fit_output(_BUILT["model"], first_vla(pipe))
    if not (run / "latest").exists():
        cfg = resolve_train_config("test")
        opt = build_optimizer(_BUILT["model"], cfg)
        save(run, 0, _BUILT["model"], opt, {"step": 0}, cfg, processor_card(pipe["shards"]),
             keep_last=1)
    return run, pipe


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("policy")


@pytest.fixture
def ckpt(root):
    return build_checkpoint(root)


# ---------------------------------------------------------------------------------------------
# Raw inputs of a shard sample, as the robot would give them (HDF5 rows, before orientation).
# ---------------------------------------------------------------------------------------------

def raw_inputs(pipe: dict, sample) -> dict:
    episode, step = sample.key.rsplit("__", 1)
    step = int(step)
    filter_dir = pipe["stages"]["filter"]
    row = next(r for r in read_json(filter_dir / "episodes.json")["episodes"] if r["id"] == episode)
    obs = load_npz(filter_dir / row["file"])["obs_index"]
    with h5py.File(pipe["raw"] / row["source"], "r") as f:
        d = f["data"][row["key"]]["obs"]
        r = int(obs[step])
        out = {"instruction": row["instruction"], "front": d["agentview_rgb"][r],
               "wrist": d["eye_in_hand_rgb"][r],
               "state": np.concatenate([d["ee_pos"][r], d["ee_ori"][r], d["gripper_states"][r]])}
        if step > 0:
            p = int(obs[step - 1])
            out.update(prev_front=d["agentview_rgb"][p], prev_wrist=d["eye_in_hand_rgb"][p])
    return out


# ---------------------------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------------------------

def test_train_inference_parity(ckpt):
    """Raw HDF5 frames + state through the policy give exactly the shard's prompt tokens."""
    run, pipe = ckpt
    policy = Policy.from_checkpoint(run, device="cpu")
    samples = read_shard(pipe["shards"] / "vla-000000.tar.gz")
    picked = [s for s in samples if s.key.endswith("__000000")][:1] + samples[5::17]
    for sample in picked:
        inputs = raw_inputs(pipe, sample)
        tokens = policy.prompt_tokens(**inputs)
        expected = np.asarray(sample.tokens[:sample.targets[0][0]], np.int64)
        np.testing.assert_array_equal(tokens, expected, err_msg=sample.key)
    # the orientation matters: without the card's rotation the image tokens differ
    upside_down = replace(policy.card, orientation="none")
    flipped = pol.Processor(upside_down, policy.processor.tokenizer,
                            policy.processor.vq).prompt_tokens(**inputs)
    assert not np.array_equal(flipped, expected)


def test_act_both_modes(ckpt):
    run, pipe = ckpt
    policy = Policy.from_checkpoint(run / "latest", device="cpu")
    inputs = raw_inputs(pipe, first_vla(pipe))
    cont = policy.act(**inputs, mode="continuous")
    disc = policy.act(**inputs, mode="discrete")
    nocache = policy.act(**inputs, mode="discrete", use_cache=False)
    greedy = policy.act(**inputs, mode="discrete", constrained=False)
    assert cont.shape == disc.shape == (K, 7)
    assert np.isfinite(cont).all() and np.isfinite(disc).all()
    np.testing.assert_array_equal(disc, nocache)
    np.testing.assert_array_equal(disc, greedy)      # a well-formed greedy answer is the grammar's
    # the fitted response decodes to the shard's bins, in robot units
    stats = policy.card.stats
    chunk = first_vla(pipe).chunk.astype(np.float64)
    assert np.abs(disc - unnormalize(chunk, stats.action.min, stats.action.max)).max() \
        <= (stats.action.max - stats.action.min).max() / 255 + 1e-9


def test_malformed_generation_is_reported(ckpt):
    run, pipe = ckpt
    policy = Policy.from_checkpoint(run, device="cpu")
    other = read_shard(pipe["shards"] / "vla-000000.tar.gz", "train")[0]
    prompt = np.asarray(other.tokens[:other.targets[0][0]], np.int64)
    try:
        policy.discrete_norm(prompt, constrained=False)
    except MalformedActions as exc:
        assert exc.problems and len(exc.tokens)
    assert policy.discrete_norm(prompt).shape == (K, 7)
    bins, problems = parse_action_blocks(np.array([vocab.ACTION_START, 10010, vocab.ACTION_END]),
                                         2, 7)
    assert len(bins) == 0 and any("expected D=7" in p for p in problems)
    assert any("expected K=2" in p for p in problems)


def test_refuses_mismatched_inputs(ckpt, tmp_path):
    run, pipe = ckpt
    policy = Policy.from_checkpoint(run, device="cpu")
    later = next(s for s in read_shard(pipe["shards"] / "vla-000000.tar.gz")
                 if not s.key.endswith("__000000"))
    inputs = raw_inputs(pipe, later)
    with pytest.raises(PolicyError, match="state: expected 8"):
        policy.act(**{**inputs, "state": np.zeros(7)})
    with pytest.raises(PolicyError, match="prev_front and prev_wrist"):
        policy.act(**{**inputs, "prev_wrist": None})
    with pytest.raises(PolicyError, match="uint8"):
        policy.act(**{**inputs, "front": inputs["front"].astype(np.float32)})
    with pytest.raises(VQMismatch, match="VQ-GAN random-small-seed1 has digest .* made with"):
        load_vq_from_record(replace(policy.card.vq, seed=1), device="cpu")
    with pytest.raises(VQMismatch, match="weights .* pass their path"):
        load_vq_from_record(replace(policy.card.vq, kind="weights", format="hf"), device="cpu")
    from fixtures_tokenizer import write_tokenizer
    path, _ = write_tokenizer(tmp_path / "text_tokenizer.json", seed=0)
    with pytest.raises(TokenizerMismatch, match="tokenizer .* digest"):
        load_tokenizer_from_record(policy.card.tokenizer, path)


def test_cards_with_a_string_only_vq_record_still_load(ckpt):
    run, _ = ckpt
    step = card_mod.resolve_checkpoint(run)
    doc = read_json(step / "processor.json")
    assert doc["vq"]["kind"] == "random" and doc["vq"]["name"] == "small"     # new cards
    legacy = {k: doc["vq"][k] for k in ("arch", "digest", "source", "untrained")}
    old = card_mod.parse_card({**doc, "vq": legacy}, where="an earlier card")
    assert old.vq == card_mod.read_card(step).vq and old.vq.seed == 0
    assert load_vq_from_record(old.vq, device="cpu").digest == doc["vq"]["digest"]


def test_attention_rule_hides_earlier_action_blocks():
    ids = np.array([0, 16100, vocab.IMAGE_START, 5, vocab.IMAGE_END, vocab.SEP,
                    *vocab.action_block(np.array([1, 2])), *vocab.action_block(np.array([3, 4])),
                    vocab.SEP])
    allowed = attention_rule(ids)
    first, second = slice(6, 10), slice(10, 14)
    assert not allowed[second, first].any()
    assert allowed[second, :6].all() and allowed[first, :6].all()
    assert allowed[14].all()                                  # the closing SEP sees everything


def test_imagine_and_rollout(ckpt, tmp_path):
    run, pipe = ckpt
    policy = Policy.from_checkpoint(run, device="cpu")
    inputs = raw_inputs(pipe, first_vla(pipe))
    result = imagine(policy, inputs["front"], inputs["wrist"], np.zeros(7), steps=2,
                     out=tmp_path / "imagine")
    assert result.codes.shape == (2, 2, RES // 16, RES // 16)
    assert result.images.shape == (2, 2, RES, RES, 3)
    assert len(result.files) == 4 and all(Path(f).stat().st_size for f in result.files)
    report = rollout(policy, pipe["shards"], steps=3, out=tmp_path / "rollout")
    assert report["held_out"] and len(report["psnr"]) == 3
    assert (tmp_path / "rollout" / "rollout_strip.png").stat().st_size > 0


def test_attention_rule_rows_match_full_matrix():
    ids = np.array([0, vocab.IMAGE_START, 5, vocab.IMAGE_END, vocab.SEP,
                    *vocab.action_block(np.array([1, 2])), *vocab.action_block(np.array([3, 4])),
                    vocab.ACTION_START, 10010])
    full = attention_rule(ids)
    for start in range(len(ids)):
        np.testing.assert_array_equal(attention_rule(ids, start), full[start:])


class ScriptedBackend:
    """A stand-in network: the logits after position p favour SEP most (always malformed as the
    first response token), then action bin `1 + (5 p) % 9`, everything else at 0."""

    def run(self, ids, start, rows, cache):
        return torch.arange(start, start + len(ids), dtype=torch.float32)[None, :, None]

    def logits(self, hidden):
        p = int(hidden[0])
        out = torch.zeros(vocab.VOCAB_SIZE)
        out[vocab.SEP] = 10.0
        out[vocab.ACTION_BIN_BASE + 1 + (5 * p) % 9] = 5.0
        out[vocab.ACTION_BIN_BASE + 200] = 7.0             # outside the card's 9 bins
        return out

    def new_cache(self):
        return None


def scripted_policy(k: int, d: int) -> Policy:
    card = SimpleNamespace(chunk=k, action_dim=d, num_bins=9)
    return Policy(SimpleNamespace(card=card), ScriptedBackend())


def test_grammar_forces_well_formed_actions():
    """Greedy decoding would stop at once (SEP); under the grammar the answer is K x D bins, each
    the best bin of the card's 9 at its position (hand-computed from the stand-in's rule)."""
    k, d, prompt = 2, 3, np.arange(10, dtype=np.int64)
    policy = scripted_policy(k, d)
    with pytest.raises(MalformedActions, match="0 well-formed action blocks, expected K=2"):
        policy.discrete_norm(prompt, constrained=False)
    norm = policy.discrete_norm(prompt)
    # response tokens sit at positions 10..: block 0 bins at 11, 12, 13 (chosen from the logits
    # after positions 10, 11, 12), block 1 bins at 16, 17, 18 (after 15, 16, 17)
    bins = np.array([[1 + (5 * p) % 9 for p in (10, 11, 12)], [1 + (5 * p) % 9 for p in (15, 16, 17)]])
    np.testing.assert_array_equal(bins, [[6, 2, 7], [4, 9, 5]])
    np.testing.assert_array_equal(policy.last_generation,
                                  np.concatenate([vocab.action_block(b) for b in bins]))
    np.testing.assert_allclose(norm, from_bins(bins, 9))
    tokens, is_bin = engine.response_grammar(k, d)
    assert len(tokens) == k * (d + 2) + 1 and tokens[-1] == vocab.SEP and is_bin.sum() == k * d
