"""RynnModel: mask in the forward pass, the head's padding mask, losses, --init loading,
KV-cached decoding under the training mask."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import ChameleonForConditionalGeneration

from pipeline.errors import RynnError
from shards import vocab as v
from trainer.config import PRESETS, LossConfig, TrainConfig
from trainer.loss import Loss
from trainer.mask import attention_mask_4d
from trainer.model import RynnModel, chameleon_config
from trainer.engine import Backend, Stepper

K, D = 2, 3


def _model(seed: int = 0) -> RynnModel:
    torch.manual_seed(seed)
    return RynnModel(PRESETS["test"], chunk=K, action_dim=D).eval()


def _vla(second_block=(1, 2, 3)) -> torch.Tensor:
    blocks = [v.ACTION_START, *[v.ACTION_BIN_BASE + d for d in (5, 6, 7)], v.ACTION_END,
              v.ACTION_START, *[v.ACTION_BIN_BASE + d for d in second_block], v.ACTION_END]
    prompt = [v.BOS, 16010, 16011, v.IMAGE_START, 40, 41, v.IMAGE_END, v.SEP]
    return torch.tensor([prompt + blocks + [v.SEP]])


def _batch(ids: torch.Tensor, is_vla: bool = True, prompt_len: int = 8) -> dict:
    labels = ids.clone()
    labels[:, :prompt_len] = v.IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
            "is_vla": torch.tensor([is_vla] * ids.shape[0]),
            "actions": torch.zeros(ids.shape[0], K, D)}


def test_later_action_block_ignores_earlier_block_tokens():
    model = _model()
    a, b = _vla((1, 2, 3)), _vla((1, 2, 3))
    b[0, 9:12] = torch.tensor([v.ACTION_BIN_BASE + d for d in (200, 100, 50)])  # change block 1
    with torch.no_grad():
        ha = model.hidden(a, torch.ones_like(a, dtype=torch.bool))
        hb = model.hidden(b, torch.ones_like(b, dtype=torch.bool))
    second = slice(13, 18)
    assert torch.allclose(ha[0, second], hb[0, second], atol=1e-5)
    assert not torch.allclose(ha[0, 9:13], hb[0, 9:13])          # block 1 itself did change


def test_head_prediction_is_the_same_alone_and_padded():
    model = _model()
    ids = _vla()
    alone = model.predict_chunk(ids[:, :9])
    padded_ids = torch.cat([ids[:, :9], torch.zeros(1, 7, dtype=torch.long)], 1)
    other = _vla()[:, :16]
    batch = torch.cat([padded_ids, other])
    valid = torch.ones_like(batch, dtype=torch.bool)
    valid[0, 9:] = False
    with torch.no_grad():
        h = model.hidden(batch, valid)
        both = model.action_head(h, model.head_context(batch, valid))
    assert alone.shape == (1, K, D)
    assert torch.allclose(alone[0], both[0], atol=1e-5)


def test_losses_per_term_and_no_vla_batch():
    model = _model().train()
    loss = Loss(LossConfig())                          # paper mode, alpha_l1 10, raw target
    batch = _batch(_vla())
    out = loss(model(batch), batch)
    assert float(out["ce_image"].detach()) == 0.0 and float(out["ce_action"].detach()) > 0
    assert torch.isclose(out["loss"], out["ce_action"] + 10 * out["l1"])
    batch = _batch(_vla(), is_vla=False)
    wm = loss(model(batch), batch)
    assert float(wm["l1"].detach()) == 0.0 and float(wm["ce_action"].detach()) == 0.0
    assert torch.isfinite(wm["loss"]) and wm["loss"].requires_grad
    model.zero_grad(set_to_none=True)
    wm["loss"].backward()
    # every parameter gets a gradient (zero for the head), so data-parallel ranks agree
    assert all(p.grad is not None for p in model.parameters())
    assert all(float(p.grad.abs().sum()) == 0.0 for p in model.action_head.parameters())


def test_published_loss_mode_and_quantized_target():
    model = _model()                                   # eval: no dropout between the two passes
    cfg = TrainConfig(model=PRESETS["test"], loss_mode="published", l1_target="quantized")
    batch = _batch(_vla())
    assert cfg.loss == LossConfig(mode="published", alpha_l1=10.0, l1_target="quantized")
    out = Loss(cfg.loss)(model(batch), batch)
    assert set(out) == {"ce", "z_loss", "l1", "loss"}
    # by hand, from the full logits: class-weighted CE (image codes 0.04), z-loss 1e-5, and L1
    # against the bin centres of the label tokens (centre of interval d-1 of 256 edges in [-1, 1])
    with torch.no_grad():
        valid = batch["attention_mask"].bool()
        h = model.hidden(batch["input_ids"], valid)
        target = batch["labels"][0, 1:]
        sel = target != v.IGNORE_INDEX
        logits = model.lm_head(h[0, :-1][sel]).float()
        t = target[sel]
        nll = -torch.log_softmax(logits, -1)[torch.arange(len(t)), t]
        w = torch.where((t >= v.IMAGE_CODE_FIRST) & (t <= v.IMAGE_CODE_LAST), 0.04, 1.0)
        ce = (w * nll).sum() / w.sum()
        z = 1e-5 * torch.logsumexp(logits, -1).pow(2).mean()
        edges = torch.linspace(-1, 1, 256, dtype=torch.float64)
        centre = [float((edges[d - 1] + edges[d]) / 2) for d in (5, 6, 7, 1, 2, 3)]
        pred = model.action_head(h, model.head_context(batch["input_ids"], valid))
        l1 = (pred.reshape(-1).double() - torch.tensor(centre)).abs().mean()
    assert float(out["ce"]) == pytest.approx(float(ce), rel=1e-5)
    assert float(out["z_loss"]) == pytest.approx(float(z), rel=1e-5)
    assert float(out["l1"]) == pytest.approx(float(l1), rel=1e-5)
    assert float(out["loss"]) == pytest.approx(float(ce + z + 10 * l1), rel=1e-5)


def test_logits_only_at_supervised_positions_match_full_logits():
    model = _model()
    batch = _batch(_vla())
    with torch.no_grad():
        h = model.hidden(batch["input_ids"], batch["attention_mask"].bool())
        full = model.lm_head(h)[:, :-1]
        sel = batch["labels"][:, 1:] != v.IGNORE_INDEX
        assert torch.allclose(model.lm_head(h[:, :-1][sel]), full[sel], atol=1e-5)


def test_init_loads_a_hugging_face_chameleon_checkpoint(tmp_path):
    torch.manual_seed(1)
    hf = ChameleonForConditionalGeneration(chameleon_config(PRESETS["test"]))
    hf.save_pretrained(tmp_path)
    model = _model()
    counts = model.load_pretrained(tmp_path)
    assert counts["skipped_vq"] > 0 and counts["loaded"] > 0
    ref = hf.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(model.backbone.layers[0].self_attn.q_proj.weight, ref)
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight)


def test_init_refuses_a_checkpoint_with_missing_weights(tmp_path):
    hf = ChameleonForConditionalGeneration(chameleon_config(PRESETS["test"]))
    hf.save_pretrained(tmp_path)
    (f,) = tmp_path.glob("*.safetensors")
    weights = load_file(str(f))
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, str(f))
    with pytest.raises(RynnError, match="missing"):
        _model().load_pretrained(tmp_path)


def test_cached_decoding_matches_the_training_forward():
    """Teacher-forced token-by-token decoding with a KV cache (the policy's Stepper) gives the
    logits the training forward (full sequence, training mask) gives, and so does rerunning the
    whole sequence without a cache: generation uses the training mask."""
    model = _model()
    ids = _vla()
    with torch.no_grad():
        full = model.lm_head(model.hidden(ids, torch.ones_like(ids, dtype=torch.bool)))[0]
    backend = Backend(model, torch.device("cpu"))
    for use_cache in (True, False):
        stepper = Stepper(backend, ids[0, :8].numpy(), use_cache=use_cache)
        steps = [stepper.next_logits()]
        for t in range(8, ids.shape[1] - 1):
            stepper.append(int(ids[0, t]))
            steps.append(stepper.next_logits())
        assert torch.allclose(torch.stack(steps), full[7:-1].float(), atol=1e-4), use_cache


def _hf_dir(tmp_path, **changes):
    """A transformers-saved Chameleon checkpoint of the `test` shape with `changes` applied."""
    torch.manual_seed(2)
    config = chameleon_config(PRESETS["test"])
    for key, value in changes.items():
        if key == "rope_theta":
            config.rope_parameters = {"rope_type": "default", "rope_theta": value}
        else:
            setattr(config, key, value)
    hf = ChameleonForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path)
    return hf


def test_init_adopts_the_checkpoints_rope_norm_eps_and_swin_norm(tmp_path):
    """A checkpoint whose rope_theta, rms_norm_eps and swin_norm differ from the preset: each is
    adopted and named, and the model then computes transformers' hidden states exactly."""
    from trainer.pretrained import reconcile
    hf = _hf_dir(tmp_path, rope_theta=500000.0, rms_norm_eps=1e-6, swin_norm=True)
    adopted, notes = reconcile(PRESETS["test"], tmp_path)
    assert (adopted.rope_theta, adopted.rms_norm_eps, adopted.swin_norm) == (500000.0, 1e-6, True)
    assert [n.split("adopted ")[1].split("=")[0] for n in notes] == \
        ["rope_theta", "rms_norm_eps", "swin_norm"]
    ids = _vla()
    valid = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        want = hf.model(input_ids=ids, attention_mask=attention_mask_4d(ids, valid)).last_hidden_state
        for cfg, close in ((adopted, True), (PRESETS["test"], False)):
            model = RynnModel(cfg, chunk=5, action_dim=7).eval()
            model.load_pretrained(tmp_path)
            assert torch.allclose(model.hidden(ids, valid), want, atol=1e-5) is close


def test_init_refuses_fields_that_shape_the_weights(tmp_path):
    from trainer.pretrained import reconcile
    _hf_dir(tmp_path, attention_bias=True)
    with pytest.raises(RynnError, match=r"attention_bias=True \(rynn-pipe builds False\)"):
        reconcile(PRESETS["test"], tmp_path)
    with pytest.raises(RynnError, match=r"hidden_size=64 \(preset 'tiny' has model.hidden=256\)"
                                        r".*--set model.hidden=64"):
        reconcile(PRESETS["tiny"], tmp_path)


def test_train_with_init_records_the_adopted_config(tmp_path, tiny_shards):
    """Through `train`: the adopted fields are said and saved in the checkpoint's config."""
    from trainer.checkpoint import read_config
    from trainer.config import resolve_train_config
    from trainer.train import train
    _hf_dir(tmp_path / "hf", rope_theta=20000.0, swin_norm=True)
    cfg = resolve_train_config("test", ["batch_size=2", "eval_every=100"], steps=1)
    step = train(cfg, tiny_shards, tmp_path / "run", init=tmp_path / "hf")
    saved, _, _ = read_config(step)
    assert (saved.model.rope_theta, saved.model.swin_norm) == (20000.0, True)


def test_ordinal_bin_init_is_smooth_in_the_bin_and_touches_only_bin_rows():
    from dataclasses import replace

    from trainer.model import ordinal_rows
    torch.manual_seed(0)
    rows = ordinal_rows(256, 64, std=0.02)
    cos = torch.nn.functional.cosine_similarity
    assert rows.shape == (256, 64) and abs(rows.std().item() - 0.02) < 0.004
    near, far = cos(rows[:-1], rows[1:]).mean().item(), cos(rows[:-128], rows[128:]).mean().item()
    assert near > 0.95 and abs(far) < 0.3
    plain = _model(seed=3).backbone.embed_tokens.weight
    torch.manual_seed(3)
    ordinal = RynnModel(replace(PRESETS["test"], bin_init="ordinal"), chunk=K, action_dim=D)
    ordinal = ordinal.backbone.embed_tokens.weight
    bins = torch.zeros(v.VOCAB_SIZE, dtype=torch.bool)
    for base in (v.STATE_BIN_BASE, v.ACTION_BIN_BASE):
        bins[base + 1:base + v.NUM_BINS + 1] = True
    assert torch.equal(plain[~bins], ordinal[~bins])        # every other row as Chameleon draws it
    state = ordinal[v.STATE_BIN_BASE + 1:v.STATE_BIN_BASE + v.NUM_BINS + 1]
    assert cos(state[:-1], state[1:]).mean() > 0.95
    assert cos(plain[v.STATE_BIN_BASE + 1:][:255], plain[v.STATE_BIN_BASE + 2:][:255]).abs().mean() < 0.3


def test_fused_adamw_is_the_same_update_up_to_rounding():
    from trainer.train import build_optimizer
    steps = {}
    for impl in ("auto", "fused", "foreach"):
        model = _model(seed=1).train()
        opt = build_optimizer(model, TrainConfig(model=PRESETS["test"], adamw=impl))
        assert opt.defaults.get("fused") is (True if impl == "fused" else None)
        for _ in range(2):
            ids = _vla()
            terms = Loss(LossConfig())(model(_batch(ids)), _batch(ids))
            opt.zero_grad()
            terms["loss"].backward()
            opt.step()
        steps[impl] = torch.cat([p.detach().flatten() for p in model.parameters()])
    # Adam divides by sqrt(v) + eps: for gradients near eps the rounding of the fused kernel shows
    # (up to one lr-sized step on ~1e-5 of the weights); everything else agrees to 1e-6.
    off = (steps["auto"] - steps["fused"]).abs()
    assert (off > 1e-6).float().mean() < 1e-4 and off.max() <= 1e-3
    assert torch.allclose(steps["auto"], steps["foreach"], atol=1e-6)
    assert not torch.allclose(steps["auto"], torch.cat([p.detach().flatten()
                                                        for p in _model(seed=1).parameters()]))
