"""``moe eval``: loss and perplexity of a checkpoint on text, the model whole in memory or read one layer at a
time (training's validation pass is training/validation.py)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from moecli.formats.checkpoint import open_to_run
from moecli.formats.layerwise import stream_forward, stream_plan, why_stream
from moecli.formats.native import dtype_name
from moecli.data.corpus import JSONL_FIELD, expand_data_args
from moecli.data.tokens import default_batch, default_window, encode_to_file, eval_windows, open_tokens, run_val_split
from moecli.errors import UserError, check_at_least
from moecli.training.validation import evaluate_loss


@torch.no_grad()
def evaluate_loss_streamed(reader, tokens: torch.Tensor, seq_len: int, starts: list[int], batch_size: int,
                           tmp: Path) -> tuple[float, int]:
    """evaluate_loss for a model read one layer at a time (layerwise.stream_forward)."""
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
    ckpt, torch_dtype, dev = open_to_run(checkpoint, dtype, device)
    dtype = dtype_name(torch_dtype)
    streamed = why_stream(ckpt.recipe, torch_dtype, stream)
    model, tok = ckpt.model_and_tokenizer(torch_dtype, dev, streamed=bool(streamed))
    directory = ckpt.directory
    pretrained = ckpt.is_hf
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
