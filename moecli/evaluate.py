"""Loss / perplexity of a checkpoint on text (``moe eval``), and the validation pass used in training."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import dtype_name, is_hf_config, load_dtype, load_with_tokenizer
from .data import (JSONL_FIELD, default_batch, default_window, encode_to_file, eval_windows, expand_data_args, open_tokens,
                   run_val_split)
from .device import model_device, resolve_device
from .distributed import all_sum_, current
from .errors import UserError, check_at_least
from .model import autocast


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
        with autocast(model, precision):  # the loss in chunks of tokens, without the batch's logits (loss.py)
            ce = model(xy[:, :-1], targets_BS=xy[:, 1:]).ce
        total += weight * float(ce) * xy[:, 1:].numel()
        count += int(weight) * xy[:, 1:].numel()
    model.train(was_training)
    if info.world > 1:
        sums = all_sum_(torch.tensor([total, count], dtype=torch.float64))
        total, count = float(sums[0]), int(sums[1])
    return (total / count if count else float("nan")), count


@torch.no_grad()
def evaluate_loss_streamed(reader, tokens: torch.Tensor, seq_len: int, starts: list[int], batch_size: int,
                           tmp: Path) -> tuple[float, int]:
    """evaluate_loss for a model read one layer at a time (layerwise.stream_forward)."""
    from .layerwise import stream_forward

    xys = [torch.stack([tokens[s: s + seq_len + 1].long() for s in starts[i: i + batch_size]])
           for i in range(0, len(starts), batch_size)]
    total, count = 0.0, 0
    for b, logits in stream_forward(reader, [xy[:, :-1] for xy in xys], tmp):
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), xys[b][:, 1:].flatten(), reduction="sum"))
        count += xys[b][:, 1:].numel()
    return (total / count if count else float("nan")), count


def evaluate(checkpoint: str, data: list[str], seq_len: int | None, batch_size: int | None, max_windows: int | None,
             dtype: str = "float32", per_file: bool = False, jsonl_field: str = JSONL_FIELD,
             device: str = "cpu", stream: bool = False) -> dict:
    """Loss on DATA; with no DATA, on the validation split of the training run the checkpoint belongs to.
    Without --seq-len the windows are the recipe's training length, or for a Hugging Face model its own context
    (up to PRETRAINED_WINDOW), and a text shorter than one window is scored as one window; without --batch-size a
    batch holds about BATCH_TOKENS tokens. With per_file, each source (a file, or - for stdin) is also scored on its
    own, under "files"."""
    if batch_size is not None:
        check_at_least("--batch-size", batch_size, 1)
    if max_windows is not None:
        check_at_least("--max-windows", max_windows, 1)
    from .checkpoint import read_recipe
    from .layerwise import open_streamed, stream_plan, why_stream

    torch_dtype, dev = load_dtype(dtype, checkpoint), resolve_device(device)
    dtype = dtype_name(torch_dtype)
    streamed = why_stream(read_recipe(checkpoint)[0], torch_dtype, stream)
    if streamed:
        model, cfg, directory, tok = open_streamed(checkpoint, torch_dtype, dev)
    else:
        model, cfg, directory, tok = load_with_tokenizer(checkpoint, torch_dtype)
        model.to(dev)
    pretrained = is_hf_config(cfg)
    context = model.recipe.model.context
    if seq_len is not None and not 1 <= seq_len <= context:
        raise UserError(f"--seq-len: must be between 1 and the model's context ({context}), got {seq_len}")

    def score(tokens: torch.Tensor, where: str) -> dict:
        n = tokens.numel()
        if n < 2:
            raise UserError(f"{where}: only {n} tokens; need at least 2 to score one")
        window, why = seq_len, "--seq-len"
        if window is None:
            window, why = default_window(model.recipe, n - 1, pretrained)  # a window scores seq_len + 1 tokens
        elif n < window + 1:
            raise UserError(f"{where}: only {n} tokens; need at least {window + 1} to score one window "
                            f"of --seq-len {window}")
        starts = eval_windows(tokens, window, max_windows)
        batch = batch_size or default_batch(window, 16)
        if streamed:
            loss, count = evaluate_loss_streamed(model, tokens, window, starts, batch, Path(tmp))
        else:
            loss, count = evaluate_loss(model, tokens, window, starts, batch)
        return {"data": where, "loss": loss, "perplexity": math.exp(min(loss, 700)),
                "bits_per_token": loss / math.log(2), "tokens": count, "windows": len(starts), "seq_len": window,
                "seq_len_from": why, "batch_size": batch}

    with tempfile.TemporaryDirectory(prefix="moe-eval-") as tmp:
        if data:
            path, sources, spans = Path(tmp) / "tokens.bin", expand_data_args(data), []
            n = encode_to_file(sources, tok, path, spans, jsonl_field)
            tokens, where = open_tokens(path, n, tok.vocab_size), ", ".join(data)
            parts = [(str(src), tokens[a:b]) for src, (a, b) in zip(sources, spans)]
        else:  # a run that mixed sources (--data-weights) held out a tail of each: the tails, joined
            tails, names, where = run_val_split(directory, model.recipe, tok)
            tokens, parts = (tails[0] if len(tails) == 1 else torch.cat(tails)), list(zip(names, tails))
            if per_file and not parts:
                raise UserError("--per-file: needs DATA (the validation split is one text, unless the run "
                                "mixed sources with --data-weights)")
        result = {"checkpoint": str(directory), **score(tokens, where), "dtype": dtype, "device": str(dev)}
        if streamed:
            result["streamed"] = {"why": streamed, **stream_plan(model.recipe, torch_dtype,
                                                                  result["batch_size"] * result["seq_len"])}
        if per_file:
            result["files"] = [score(toks, name) for name, toks in parts]
    return result
