"""The training loss, built from its own config and applied to the model's outputs: the logits
at supervised positions and the head's actions (trainer/model.py computes nothing else).

    loss = Loss(train_cfg.loss)          # LossConfig: mode, alpha_l1, l1_target
    terms = loss(model(batch), batch)    # {"loss", "ce_action", "ce_image", "l1"}

Paper mode: L = CE(action tokens) + CE(image tokens) + alpha * L1(head).
  The action CE averages over every target token of VLA samples (the action blocks with their
  start/end markers and the response's final SEP); the image CE over every target token of
  world-model samples (image codes, start/grid/row-end/end tokens and the final SEP). A term with
  no tokens in the batch is 0.
Published mode: one CE with class weights (image-code ids 0.04, all else 1) + 1e-5 * z-loss
  (mean logsumexp^2), plus alpha * L1 as the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shards import vocab
from shards.bins import from_bins
from trainer.config import LossConfig
from trainer.model import Outputs

Z_LOSS = 1e-5
IMAGE_CODE_WEIGHT = 0.04


class Loss:
    """Loss terms of one batch: paper mode {"loss", "ce_action", "ce_image", "l1"}, published
    mode {"loss", "ce", "z_loss", "l1"}; "loss" = the CE terms + alpha_l1 x L1."""

    def __init__(self, cfg: LossConfig) -> None:
        self.cfg = cfg

    def __call__(self, out: Outputs, batch: dict) -> dict[str, torch.Tensor]:
        terms = self.token_terms(out)
        l1_term = self.l1(out, batch)
        terms["loss"] = sum(terms.values()) + self.cfg.alpha_l1 * l1_term
        terms["l1"] = l1_term
        return terms

    def token_terms(self, out: Outputs) -> dict[str, torch.Tensor]:
        if self.cfg.mode == "published":
            return published_ce(out.logits, out.targets)
        return paper_ce(out.logits, out.targets, out.token_is_vla)

    def l1(self, out: Outputs, batch: dict) -> torch.Tensor:
        """L1 of the head on the VLA rows; with none, 0 x the head's idle output (so the head's
        parameters still get a zero gradient, see RynnModel.forward)."""
        rows = out.vla_rows
        if not bool(rows.any()):
            return out.actions.float().sum() * 0.0
        if self.cfg.l1_target == "quantized":
            chunk, action_dim = out.actions.shape[1:]
            target = quantized_target(batch["labels"][rows], chunk, action_dim)
        else:
            target = batch["actions"][rows]
        return l1(out.actions, target)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if not bool(mask.any()):
        return values.sum() * 0.0  # keeps the graph, no NaN
    return values[mask].mean()


def paper_ce(logits: torch.Tensor, targets: torch.Tensor, is_vla_tok: torch.Tensor
             ) -> dict[str, torch.Tensor]:
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    return {"ce_action": masked_mean(ce, is_vla_tok), "ce_image": masked_mean(ce, ~is_vla_tok)}


def published_ce(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    logits = logits.float()
    weight = torch.ones(logits.shape[-1], device=logits.device)
    weight[vocab.IMAGE_CODE_FIRST:vocab.IMAGE_CODE_LAST + 1] = IMAGE_CODE_WEIGHT
    ce = F.cross_entropy(logits, targets, weight=weight)
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    return {"ce": ce, "z_loss": Z_LOSS * z}


def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error in normalized action space (rows without VLA samples never get here:
    the model returns 0 x the head's output for them)."""
    return F.l1_loss(pred.float(), target.float().to(pred.device))


def quantized_target(labels: torch.Tensor, chunk: int, action_dim: int,
                     num_bins: int = vocab.NUM_BINS) -> torch.Tensor:
    """The published L1 target: bin centres decoded from the action-bin labels (B, K, D)."""
    rows = []
    for row in labels:
        bins = vocab.action_bins_of(row.cpu().numpy())[: chunk * action_dim]
        rows.append(torch.as_tensor(from_bins(bins, num_bins), dtype=torch.float32))
    return torch.stack(rows).reshape(-1, chunk, action_dim).to(labels.device)
