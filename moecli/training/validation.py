"""The loss on held-out windows: training's validation passes, and ``moe eval``'s in-memory scoring."""

from __future__ import annotations

import torch

from moecli.model.transformer import autocast
from moecli.parallel.collectives import all_sum_
from moecli.parallel.device import model_device
from moecli.parallel.launch import current


@torch.no_grad()
def evaluate_loss(model, tokens: torch.Tensor, seq_len: int, starts: list[int], batch_size: int,
                  precision: str = "fp32") -> tuple[float, int]:
    """Mean next-token cross-entropy over windows tokens[s : s+seq_len+1]; returns (loss, tokens scored).
    The forward runs under ``precision``'s autocast (training's validation passes use train.precision).

    Under torch.distributed every rank scores an interleaved share of each batch and the sums are
    all-reduced (the result is the single-process one). Every rank runs the same number of forwards,
    as expert parallelism needs: a rank with no window left in the last batch scores one with weight 0.
    """
    info = current()
    device = model_device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        mine = starts[i: i + batch_size][info.rank::info.world]
        weight = 1.0 if mine else 0.0
        xy = torch.stack([tokens[s: s + seq_len + 1].long() for s in (mine or starts[i: i + 1])]).to(device)
        with autocast(model, precision):  # the loss in chunks of tokens, without the batch's logits (model/loss.py)
            ce = model(xy[:, :-1], targets_BS=xy[:, 1:]).ce
        total += weight * float(ce) * xy[:, 1:].numel()
        count += int(weight) * xy[:, 1:].numel()
    model.train(was_training)
    if info.world > 1:
        sums = all_sum_(torch.tensor([total, count], dtype=torch.float64))
        total, count = float(sums[0]), int(sums[1])
    return (total / count if count else float("nan")), count


def validate(model, data, t, starts: list[list[int]]) -> tuple[float, dict | None]:
    """(val_loss, per source or None): the loss over each validation stream's windows (``starts``, one list per
    stream). With --data-weights and each source's own tail, val_loss is the sources' losses weighted as
    training samples them (the loss of the training mixture), and each source's loss is returned too."""
    losses = [evaluate_loss(model, v, t.seq_len, s, t.batch_size, t.precision)[0] for v, s in zip(data.val, starts)]
    if len(losses) == 1:
        return losses[0], None
    return sum(w * loss for w, loss in zip(data.weights, losses)), dict(zip(data.sources, losses))
