"""``moe generate``: sample a continuation of a prompt (temperature, top-k, seeded)."""

from __future__ import annotations

import torch

from .checkpoint import load_with_tokenizer
from .errors import UserError, check_at_least
from .model import KVCache


@torch.no_grad()
def sample(model, prompt_ids: list[int], max_new_tokens: int, temperature: float, top_k: int,
           seed: int, kv_cache: bool = True) -> list[int]:
    """Each new token is sampled from the model's logits given the last `context` tokens before it.

    With kv_cache, the prompt runs once and every later forward runs only the newest token against the
    keys and values kept from before (model.KVCache); once the sequence outgrows the context, each
    step re-runs the last `context` tokens, as without the cache (their positions shift).
    """
    if max_new_tokens == 0:
        return []
    gen = torch.Generator().manual_seed(seed)
    context = model.recipe.model.context
    ids = list(prompt_ids)
    model.eval()
    cache = KVCache.empty(len(model.layers)) if kv_cache and len(ids) < context else None
    logits = model(torch.tensor([ids[-context:]]), cache).logits_BSV[0, -1].float()
    for i in range(max_new_tokens):
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if 0 < top_k < logits.numel():
                kth = logits.topk(top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        ids.append(nxt)
        if i == max_new_tokens - 1:
            break
        if cache is not None and cache.pos < context:
            logits = model(torch.tensor([[nxt]]), cache).logits_BSV[0, -1].float()
        else:
            cache = None
            logits = model(torch.tensor([ids[-context:]])).logits_BSV[0, -1].float()
    return ids[len(prompt_ids):]


def generate(checkpoint: str, prompt: str, max_new_tokens: int, temperature: float, top_k: int, seed: int) -> dict:
    check_at_least("--max-new-tokens", max_new_tokens, 0)
    check_at_least("--temperature", temperature, 0)
    check_at_least("--top-k", top_k, 0, " (0 = all tokens)")
    model, _, _, tok = load_with_tokenizer(checkpoint)
    prompt_ids = tok.encode(prompt)
    if not prompt_ids:
        raise UserError("--prompt: empty prompt")
    new_ids = sample(model, prompt_ids, max_new_tokens, temperature, top_k, seed)
    return {"prompt": prompt, "completion": tok.decode(new_ids), "new_tokens": len(new_ids), "seed": seed}
