"""``moe generate``: sample a continuation of a prompt (temperature, top-k, top-p, seeded), streamed as it grows."""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from .checkpoint import load_dtype, load_with_tokenizer
from .errors import UserError, check_at_least
from .model import KVCache


def pick(logits_BV: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> list[int]:
    """The next token of each row of logits: argmax at temperature 0; else sampled from
    softmax(logits / temperature), restricted to the top_k most likely (0 = all) and then to the
    smallest set of most likely tokens whose probabilities reach top_p (nucleus sampling; 1 = all)."""
    if temperature == 0:
        return logits_BV.argmax(-1).tolist()
    logits_BV = logits_BV / temperature
    if 0 < top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1:
        sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
        p_BV = torch.softmax(sorted_BV, -1)
        before_BV = p_BV.cumsum(-1) - p_BV  # the probability ahead of each token
        # the most likely token is never cut (nothing ahead of it)
        cut_BV = torch.zeros_like(logits_BV, dtype=torch.bool).scatter_(-1, order_BV, before_BV >= top_p)
        logits_BV = logits_BV.masked_fill(cut_BV, float("-inf"))
    return torch.multinomial(torch.softmax(logits_BV, -1), 1, generator=gen)[:, 0].tolist()


@torch.no_grad()
def stream(model, prompt_ids: list[int], max_new_tokens: int, temperature: float, top_k: int, seed: int,
           top_p: float = 1.0, kv_cache: bool = True, num_samples: int = 1) -> Iterator[list[int]]:
    """Yields the next token of each of num_samples continuations (one batch), step by step; each is picked
    (``pick``) from the model's logits given the last `context` tokens before it.

    With kv_cache, the prompt runs once and every later forward runs only the newest tokens against the
    keys and values kept from before (model.KVCache); once the sequence outgrows the context, each
    step re-runs the last `context` tokens, as without the cache (their positions shift).
    """
    if max_new_tokens == 0:
        return
    gen = torch.Generator().manual_seed(seed)
    context = model.recipe.model.context
    rows = [list(prompt_ids) for _ in range(num_samples)]
    model.eval()
    # room for every token the cache can take: the prompt and the new tokens, up to the context
    capacity = min(context, len(prompt_ids) + max_new_tokens - 1)
    cache = KVCache.empty(len(model.layers), capacity) if kv_cache and len(prompt_ids) < context else None
    logits_BV = model(torch.tensor([r[-context:] for r in rows]), cache).logits_BSV[:, -1].float()
    for i in range(max_new_tokens):
        nxt_B = pick(logits_BV, temperature, top_k, top_p, gen)
        for r, t in zip(rows, nxt_B):
            r.append(t)
        yield nxt_B
        if i == max_new_tokens - 1:
            break
        if cache is not None and cache.pos < context:
            logits_BV = model(torch.tensor([[t] for t in nxt_B]), cache).logits_BSV[:, -1].float()
        else:
            cache = None
            logits_BV = model(torch.tensor([r[-context:] for r in rows])).logits_BSV[:, -1].float()


def sample(model, prompt_ids: list[int], max_new_tokens: int, temperature: float, top_k: int,
           seed: int, kv_cache: bool = True, top_p: float = 1.0) -> list[int]:
    """The new tokens of one continuation (``stream`` with one sample) as a list."""
    return [t for t, in stream(model, prompt_ids, max_new_tokens, temperature, top_k, seed, top_p, kv_cache)]


class TextStream:
    """Turns a growing list of token ids into text pieces that are safe to print.

    A piece is released once the decoded text extends what was released before and does not end in
    U+FFFD (a multi-byte character, or a token whose bytes are split over several ids, still
    incomplete). ``finish`` releases the rest. The pieces join to tok.decode(all ids) wherever decoding
    more ids only appends text, as it does for the byte tokenizer and byte-level BPE; a tokenizer whose
    decoding rewrites earlier text holds its pieces back until it appends again."""

    def __init__(self, tok):
        self.tok, self.ids, self.done = tok, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.done):
            return ""
        piece, self.done = text[len(self.done):], text
        return piece

    def finish(self) -> str:
        text = self.tok.decode(self.ids)
        piece = text[len(self.done):] if text.startswith(self.done) else ""
        self.done = text
        return piece


def generate(checkpoint: str, prompt: str, max_new_tokens: int, temperature: float, top_k: int, seed: int,
             top_p: float = 1.0, dtype: str = "float32", on_text: Callable[[str], None] | None = None,
             num_samples: int = 1) -> dict:
    """Sample a completion of `prompt` (num_samples of them, in one batch: "completions"); on_text, when
    given, receives the first piece by piece as its tokens come (the pieces join to its "completion")."""
    check_at_least("--max-new-tokens", max_new_tokens, 0)
    check_at_least("--temperature", temperature, 0)
    check_at_least("--top-k", top_k, 0, " (0 = all tokens)")
    check_at_least("--num-samples", num_samples, 1)
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p: must be in (0, 1] (1 = all tokens), got {top_p}")
    model, _, _, tok = load_with_tokenizer(checkpoint, load_dtype(dtype))
    prompt_ids = tok.encode(prompt)
    if not prompt_ids:
        raise UserError("--prompt: empty prompt")
    rows: list[list[int]] = [[] for _ in range(num_samples)]
    text = TextStream(tok) if on_text is not None else None  # decoded as it grows only when streamed
    for tokens in stream(model, prompt_ids, max_new_tokens, temperature, top_k, seed, top_p,
                         num_samples=num_samples):
        for row, token in zip(rows, tokens):
            row.append(token)
        if text is not None and (piece := text.push(tokens[0])):
            on_text(piece)
    if text is not None and (piece := text.finish()):
        on_text(piece)
    completions = [tok.decode(row) for row in rows]
    res = {"prompt": prompt, "completion": completions[0], "new_tokens": len(rows[0]), "seed": seed,
           "temperature": temperature, "top_k": top_k, "top_p": top_p, "dtype": dtype}
    if num_samples > 1:
        res["completions"] = completions
    return res
