"""`rynn-pipe export`: transformers loads the export with every weight, the backbone computes the
same hidden states as RynnModel, and a Policy loaded from the export acts as the run does.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_export.py -q

The run is test_policy's checkpoint (the real pipeline's shards, the `test` preset saved by the
trainer's own `save`, output projection fitted so discrete decoding is well formed).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, ChameleonForConditionalGeneration, ChameleonModel

from pipeline.io import read_json
from shards import vocab
from shards.shard_set import read_shard
from shards.vq import preprocess
from trainer import checkpoint
from trainer.export import export, vocabulary_map
from trainer.mask import attention_mask_4d
from trainer.card import resolve_checkpoint
from trainer.policy import Policy, orient

from test_policy import build_checkpoint, first_vla, raw_inputs


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run, pipe = build_checkpoint(root)
    rows = [{"step": 0, "loss": 1.5, "ce_action": 0.25, "lr": 1e-3}, {"step": 0, "val_loss": 2.5},
            {"step": 7, "loss": 9.0}]             # a row after the exported step is not its loss
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = export(run, root / "hf")
    return run, pipe, out


def _load_info(cls, out):
    model, info = cls.from_pretrained(out, output_loading_info=True)
    return model.eval(), {k: list(v) for k, v in info.items() if v}


def test_transformers_loads_every_weight(exported):
    run, _, out = exported
    lm, problems = _load_info(ChameleonForConditionalGeneration, out)
    assert problems == {}, problems
    step = resolve_checkpoint(run)
    saved = load_file(str(step / "model.safetensors"))
    state = lm.state_dict()
    assert torch.equal(state["lm_head.weight"], saved["lm_head.weight"])
    assert torch.equal(state["model.norm.weight"], saved["backbone.norm.weight"])
    backbone, problems = _load_info(AutoModel, out)
    assert type(backbone) is ChameleonModel       # the base model: every backbone weight, and
    assert problems == {"unexpected_keys": ["lm_head.weight"]}, problems   # no output head
    card = read_json(out / "processor.json")
    assert lm.config.model_type == "chameleon" and lm.config.image_token_id == 8711
    assert lm.config.vocabulary_map["<s>"] == vocab.BOS
    assert card == read_json(step / "processor.json")


def test_hidden_states_equal_rynn_model(exported):
    run, pipe, out = exported
    rynn = checkpoint.load_model(resolve_checkpoint(run))
    hf, _ = _load_info(ChameleonForConditionalGeneration, out)
    sample = first_vla(pipe)
    ids = torch.as_tensor(np.asarray(sample.tokens, np.int64))[None]
    valid = torch.ones_like(ids, dtype=torch.bool)
    pos = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        ours = rynn.hidden(ids, valid)
        theirs = hf.model(input_ids=ids, attention_mask=attention_mask_4d(ids, valid),
                          position_ids=pos).last_hidden_state
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
        torch.testing.assert_close(hf.lm_head(theirs[0, :50]), rynn.lm_head(ours[0, :50]),
                                   rtol=0, atol=1e-4)
        # a prompt without a response: the mask is plain causality, transformers' own default
        prompt = ids[:, :sample.targets[0][0]]
        plain = hf.model(input_ids=prompt).last_hidden_state
        torch.testing.assert_close(plain, rynn.hidden(prompt, valid[:, :prompt.shape[1]]),
                                   rtol=0, atol=1e-5)


def test_vq_and_vocabulary_map_give_the_shard_image_tokens(exported):
    """transformers' own `get_image_tokens` (exported VQ-GAN + vocabulary_map) yields the image
    codes of the shard sample, as rynn-pipe's tokenizer maps them."""
    run, pipe, out = exported
    hf, _ = _load_info(ChameleonForConditionalGeneration, out)
    policy = Policy.from_pretrained(out, device="cpu")
    inputs = raw_inputs(pipe, first_vla(pipe))
    frame = orient(inputs["front"], policy.card.orientation)
    pixels = torch.as_tensor(preprocess(frame[None], policy.card.resolution))
    with torch.no_grad():
        theirs = hf.get_image_tokens(pixels)[0].numpy()
    codes = policy.processor.image_codes([inputs["front"]])[0].reshape(-1)
    np.testing.assert_array_equal(theirs, policy.processor.tokenizer.image_code_to_id[codes])


def test_act_through_export_equals_act_through_run(exported):
    run, pipe, out = exported
    local = Policy.from_checkpoint(run, device="cpu")
    remote = Policy.from_pretrained(out, device="cpu")
    assert remote.processor.vq.digest == local.processor.vq.digest
    inputs = raw_inputs(pipe, first_vla(pipe))      # its fitted response decodes well formed
    for mode in ("continuous", "discrete"):
        np.testing.assert_array_equal(remote.act(**inputs, mode=mode), local.act(**inputs, mode=mode))
    other = raw_inputs(pipe, read_shard(pipe["shards"] / "vla-000000.tar.gz")[3])
    np.testing.assert_array_equal(remote.act(**other), local.act(**other))


def test_model_card_names_the_training(exported):
    run, _, out = exported
    text = (out / "README.md").read_text()
    card = read_json(out / "processor.json")
    assert card["shards_manifest_sha256"] in text
    assert f"recipe: `{card['recipe']}`" in text
    assert "step 0" in text and card["vq"]["digest"] in text
    assert "loss 1.5 (step 0), ce_action 0.25 (step 0), val_loss 2.5 (step 0)" in text
    assert not list(out.parent.glob(".tmp-*"))
    with pytest.raises(Exception, match="exists and is not an export"):
        export(run, resolve_checkpoint(run).parent)      # never over a run directory


def test_fallback_vocabulary_map_follows_the_code_map(exported):
    _, _, out = exported
    policy = Policy.from_pretrained(out, device="cpu")
    mapping = vocabulary_map(policy.processor.tokenizer)
    config = json.loads((out / "config.json").read_text())
    assert config["vocabulary_map"] == mapping
    assert mapping["IMGIMGAZ"] == int(policy.processor.tokenizer.image_code_to_id[0])
    assert mapping["IMGIMGBCDZ"] == int(policy.processor.tokenizer.image_code_to_id[123])


def test_fresh_interpreter_loads_the_export(exported):
    """What a user does: a new Python process, transformers only."""
    _, _, out = exported
    code = ("import sys, json; from transformers import ChameleonForConditionalGeneration as C; "
            "m, info = C.from_pretrained(sys.argv[1], output_loading_info=True); "
            "print(json.dumps({'params': sum(p.numel() for p in m.parameters()), "
            "'problems': {k: list(v) for k, v in info.items() if v}}))")
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                          check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["problems"] == {}
    expected = sum(t.numel() for t in load_file(str(out / "model.safetensors")).values())
    assert result["params"] == expected


def test_cli_export_then_act_from_the_export(exported, tmp_path):
    from typer.testing import CliRunner
    from pipeline.cli import app
    run, pipe, _ = exported
    result = CliRunner().invoke(app, ["export", str(run), str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    inputs = raw_inputs(pipe, first_vla(pipe))
    for name in ("front", "wrist", "prev_front", "prev_wrist", "state"):
        if name in inputs:
            np.save(tmp_path / f"{name}.npy", inputs[name])
    args = ["act", "--checkpoint", str(tmp_path / "hf"), "--instruction", inputs["instruction"],
            "--state", str(tmp_path / "state.npy"), "--out", str(tmp_path / "a.npy")]
    args += [x for n in ("front", "wrist", "prev_front", "prev_wrist") if n in inputs
             for x in (f"--{n.replace('_', '-')}", str(tmp_path / f"{n}.npy"))]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    want = Policy.from_checkpoint(run, device="cpu").act(**inputs)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), want)


def test_vocabulary_map_of_a_chameleon_tokenizer_file(tmp_path):
    """A Chameleon-format text_tokenizer.json: the map is the file's whole vocabulary, and
    transformers' image-token mapping built from it agrees with rynn-pipe's code map."""
    from tokenizers import Tokenizer
    from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping
    from fixtures_tokenizer import write_tokenizer
    from shards.tokenizer import load_text_tokenizer
    path, _ = write_tokenizer(tmp_path / "text_tokenizer.json")
    tok = load_text_tokenizer(path)
    mapping = vocabulary_map(tok)
    assert mapping == Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    theirs = ChameleonImageVocabularyMapping(mapping).img2bpe
    assert [theirs[c] for c in range(vocab.CODEBOOK_SIZE)] == tok.image_code_to_id.tolist()
