"""``moe generate``: sample a continuation of a prompt (temperature, top-k, top-p, seeded), streamed as it grows."""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from .checkpoint import load_with_tokenizer
from .errors import UserError, check_at_least
from .evaluate import EVAL_DTYPES
from .model import KVCache


def pick(logits_V: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> int:
    """The next token from one position's logits: argmax at temperature 0; else sampled from
    softmax(logits / temperature), restricted to the top_k most likely (0 = all) and then to the
    smallest set of most likely tokens whose probabilities reach top_p (nucleus sampling; 1 = all)."""
    if temperature == 0:
        return int(logits_V.argmax())
    logits_V = logits_V / temperature
    if 0 < top_k < logits_V.numel():
        kth = logits_V.topk(top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    if top_p < 1:
        sorted_V, order_V = torch.sort(logits_V, descending=True)
        p_V = torch.softmax(sorted_V, -1)
        before_V = p_V.cumsum(-1) - p_V  # the probability ahead of each token
        cut_V = torch.zeros_like(logits_V, dtype=torch.bool)
        cut_V[order_V] = before_V >= top_p  # the most likely token is never cut (nothing ahead of it)
        logits_V = logits_V.masked_fill(cut_V, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits_V, -1), 1, generator=gen))


@torch.no_grad()
def stream(model, prompt_ids: list[int], max_new_tokens: int, temperature: float, top_k: int, seed: int,
           top_p: float = 1.0, kv_cache: bool = True) -> Iterator[int]:
    """Yields the new tokens one at a time; each is picked (``pick``) from the model's logits given the
    last `context` tokens before it.

    With kv_cache, the prompt runs once and every later forward runs only the newest token against the
    keys and values kept from before (model.KVCache); once the sequence outgrows the context, each
    step re-runs the last `context` tokens, as without the cache (their positions shift).
    """
    if max_new_tokens == 0:
        return
    gen = torch.Generator().manual_seed(seed)
    context = model.recipe.model.context
    ids = list(prompt_ids)
    model.eval()
    # room for every token the cache can take: the prompt and the new tokens, up to the context
    capacity = min(context, len(ids) + max_new_tokens - 1)
    cache = KVCache.empty(len(model.layers), capacity) if kv_cache and len(ids) < context else None
    logits = model(torch.tensor([ids[-context:]]), cache).logits_BSV[0, -1].float()
    for i in range(max_new_tokens):
        nxt = pick(logits, temperature, top_k, top_p, gen)
        ids.append(nxt)
        yield nxt
        if i == max_new_tokens - 1:
            break
        if cache is not None and cache.pos < context:
            logits = model(torch.tensor([[nxt]]), cache).logits_BSV[0, -1].float()
        else:
            cache = None
            logits = model(torch.tensor([ids[-context:]])).logits_BSV[0, -1].float()


def sample(model, prompt_ids: list[int], max_new_tokens: int, temperature: float, top_k: int,
           seed: int, kv_cache: bool = True, top_p: float = 1.0) -> list[int]:
    """The new tokens of ``stream`` as one list."""
    return list(stream(model, prompt_ids, max_new_tokens, temperature, top_k, seed, top_p, kv_cache))


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
             top_p: float = 1.0, dtype: str = "float32", on_text: Callable[[str], None] | None = None) -> dict:
    """Sample a completion of `prompt`; on_text, when given, receives it piece by piece as tokens come
    (the pieces join to the result's "completion")."""
    check_at_least("--max-new-tokens", max_new_tokens, 0)
    check_at_least("--temperature", temperature, 0)
    check_at_least("--top-k", top_k, 0, " (0 = all tokens)")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p: must be in (0, 1] (1 = all tokens), got {top_p}")
    if dtype not in EVAL_DTYPES:
        raise UserError(f"--dtype: one of {', '.join(EVAL_DTYPES)}, got {dtype!r}")
    model, _, _, tok = load_with_tokenizer(checkpoint, EVAL_DTYPES[dtype])
    prompt_ids = tok.encode(prompt)
    if not prompt_ids:
        raise UserError("--prompt: empty prompt")
    text = TextStream(tok)
    for token in stream(model, prompt_ids, max_new_tokens, temperature, top_k, seed, top_p):
        piece = text.push(token)
        if piece and on_text is not None:
            on_text(piece)
    piece = text.finish()
    if piece and on_text is not None:
        on_text(piece)
    return {"prompt": prompt, "completion": text.done, "new_tokens": len(text.ids), "seed": seed,
            "temperature": temperature, "top_k": top_k, "top_p": top_p, "dtype": dtype}
