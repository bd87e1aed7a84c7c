"""``moe generate``: sample a continuation of a prompt (temperature, top-k, seeded)."""

from __future__ import annotations

import torch

from .checkpoint import load_with_tokenizer
from .errors import UserError, check_at_least


@torch.no_grad()
def sample(model, prompt_ids: list[int], max_new_tokens: int, temperature: float, top_k: int,
           seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    context = model.recipe.model.context
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    model.eval()
    for _ in range(max_new_tokens):
        logits = model(ids[:, -context:]).logits_BSV[0, -1].float()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if 0 < top_k < logits.numel():
                kth = logits.topk(top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return ids[0, len(prompt_ids):].tolist()


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
