"""``moe generate``: sample a continuation of a prompt (temperature, top-k, top-p, seeded), streamed as it grows,
or of many prompts, batched."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from moecli.formats.checkpoint import open_to_run
from moecli.formats.native import dtype_name
from moecli.data.corpus import JSONL_FIELD, is_jsonl, jsonl_docs
from moecli.parallel.device import model_device
from moecli.errors import UserError, check_at_least
from moecli.model.transformer import KVCache


def pick(logits_BV: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> list[int]:
    """The next token of each row of logits: argmax at temperature 0; else sampled from
    softmax(logits / temperature), restricted to the top_k most likely (0 = all) and then to the
    smallest set of most likely tokens whose probabilities reach top_p (nucleus sampling; 1 = all).
    On the CPU, whatever device computed the logits, as the seeded generator is a CPU one."""
    logits_BV = logits_BV.cpu()
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
    """Yields the next token of each of num_samples continuations of one prompt (one batch), step by step
    (``stream_prompts`` with one prompt)."""
    yield from stream_prompts(model, [prompt_ids], max_new_tokens, temperature, top_k, [seed], top_p, kv_cache,
                              num_samples)


@torch.no_grad()
def stream_prompts(model, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_k: int,
                   seeds: list[int], top_p: float = 1.0, kv_cache: bool = True,
                   num_samples: int = 1) -> Iterator[list[int]]:
    """Yields the next token of every row of one batch, step by step: num_samples rows per prompt, the
    prompts in order. Each token is picked (``pick``) from the model's logits given the last `context`
    tokens of its row; prompt g's rows with their own generator, seeded seeds[g], so that they do not
    depend on the other prompts of the batch (beyond rounding).

    With kv_cache, each prompt runs once, into a cache where every prompt ends at the same slot (the
    shorter ones start later, their empty slots masked: ``Transformer.new_cache``), and every later forward
    runs only the rows' newest tokens against the keys and values kept from before. Once the longest row
    outgrows the context, each step re-runs the last `context` tokens of each row, as without the cache
    (their positions shift): one forward when the windows are equally long, else one per prompt.
    """
    if max_new_tokens == 0:
        return
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    context = model.recipe.model.context
    n = num_samples
    rows = [list(ids) for ids in prompts for _ in range(n)]
    model.eval()
    longest = max(len(ids) for ids in prompts)
    cache = None
    if kv_cache and longest < context:
        # room for every token the cache can take: the prompts and the new tokens, up to the context
        cache, logits_BV = _prefill(model, prompts, n, min(context, longest + max_new_tokens - 1))
    else:
        logits_BV = _windows(model, rows, n, context)
    for i in range(max_new_tokens):
        nxt_B = [t for g, gen in enumerate(gens) for t in pick(logits_BV[g * n: (g + 1) * n], temperature, top_k,
                                                                top_p, gen)]
        for r, t in zip(rows, nxt_B):
            r.append(t)
        yield nxt_B
        if i == max_new_tokens - 1:
            break
        if cache is not None and cache.pos < context:
            logits_BV = model(torch.tensor([[t] for t in nxt_B]), cache).logits_BSV[:, -1].float()
        else:
            cache = None
            logits_BV = _windows(model, rows, n, context)


def _prefill(model, prompts: list[list[int]], n: int, capacity: int) -> tuple[KVCache, torch.Tensor]:
    """A cache of `capacity` slots holding every prompt (n rows each), all ending at the longest one's end,
    and the logits after each row's last token (B x V). Each prompt runs once, as one row, and its keys and
    values are copied to its other n - 1 rows: the same as a one-sample run's, for a fraction of the work."""
    longest = max(len(ids) for ids in prompts)
    cache = model.new_cache(len(prompts) * n, capacity)
    pad_BL = None
    logits = []
    for g, ids in enumerate(prompts):
        start, first = longest - len(ids), g * n
        logits.append(model(torch.tensor([ids]), cache.rows(first, first + 1, start)).logits_BSV[:, -1].float()
                      .expand(n, -1))
        for layer in cache.layers:
            if layer.state is not None:  # a linear layer: its states after the prompt, copied to the other rows
                for t in layer.state:
                    t[first + 1: first + n] = t[first]
                continue
            for buf in (layer.k_BHLDh, layer.v_BHLDh):
                buf[first + 1: first + n, :, start:longest] = buf[first, :, start:longest]
        if start:
            if pad_BL is None:
                pad_BL = torch.zeros(len(prompts) * n, capacity, dtype=torch.bool,
                                     device=model.output.weight.device)
            pad_BL[first: first + n, :start] = True
    cache.filled(longest, pad_BL)
    return cache, torch.cat(logits)


def _windows(model, rows: list[list[int]], n: int, context: int) -> torch.Tensor:
    """The logits after each row's last `context` tokens (B x V), without a cache: one forward when every
    window is as long, else one per prompt (its n rows are as long)."""
    if len({min(len(r), context) for r in rows}) == 1:
        return model(torch.tensor([r[-context:] for r in rows])).logits_BSV[:, -1].float()
    return torch.cat([model(torch.tensor([r[-context:] for r in rows[g: g + n]])).logits_BSV[:, -1].float()
                      for g in range(0, len(rows), n)])


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


class StopText:
    """Cuts a completion's text before the first occurrence of any of the stop strings. ``add`` takes the
    text piece by piece and returns what is safe to print: never any of a stop string, and nothing that
    may still turn out to begin one (held back until the next pieces decide); ``finish`` releases the rest."""

    def __init__(self, stops: list[str]):
        self.stops, self.longest = stops, max(map(len, stops))
        self.text, self.out, self.hit = "", 0, False  # the text so far (cut at a stop), how much was released

    def add(self, piece: str) -> str:
        if self.hit or not piece:
            return ""
        start = max(0, len(self.text) - self.longest + 1)  # a stop found now ends in the new piece
        self.text += piece
        found = [i for stop in self.stops if (i := self.text.find(stop, start)) >= 0]
        if found:
            self.hit, self.text = True, self.text[:min(found)]
            return self._release(len(self.text))
        held = max((k for stop in self.stops for k in range(1, len(stop)) if self.text.endswith(stop[:k])),
                   default=0)
        return self._release(len(self.text) - held)

    def finish(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        piece, self.out = self.text[self.out: upto], max(self.out, upto)
        return piece


def parse_stops(stops: list[str] | None) -> list[str]:
    """--stop values with the escapes \\n, \\t, \\r and \\\\ read as newline, tab, carriage return and backslash."""
    out = []
    for raw in stops or []:
        text, i = [], 0
        while i < len(raw):
            if raw[i] == "\\" and i + 1 < len(raw) and raw[i + 1] in "ntr\\":
                text.append({"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[raw[i + 1]])
                i += 2
            else:
                text.append(raw[i])
                i += 1
        if not text:
            raise UserError("--stop: empty stop string")
        out.append("".join(text))
    return out


@dataclass
class Stops:
    """What ends a completion before max_new_tokens: any of `texts` (cut before it) or of `tokens` (left out)."""
    texts: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


@dataclass
class Sampling:
    """How ``generate`` and ``generate_prompts`` sample: the options of ``moe generate`` that do not say what
    to load or where the prompts come from."""
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # 0 = all tokens
    seed: int = 0  # with many prompts, prompt i samples with seed + i
    top_p: float = 1.0  # 1 = all tokens
    num_samples: int = 1  # continuations of each prompt, sampled in one batch
    stops: list[str] = field(default_factory=list)  # texts that end a completion (cut before them)
    stop_tokens: list[int] = field(default_factory=list)  # token ids that end a completion (left out)
    ignore_eos: bool = False  # do not add the model's end-of-sequence ids to stop_tokens

    def check(self) -> None:
        """Each option in range, or a UserError naming its flag."""
        check_at_least("--max-new-tokens", self.max_new_tokens, 0)
        check_at_least("--temperature", self.temperature, 0)
        check_at_least("--top-k", self.top_k, 0, " (0 = all tokens)")
        check_at_least("--num-samples", self.num_samples, 1)
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p: must be in (0, 1] (1 = all tokens), got {self.top_p}")


def eos_tokens(directory: Path, cfg: dict) -> list[int]:
    """A Hugging Face model directory's end-of-sequence token ids: generation_config.json's eos_token_id
    where it has one, else config.json's (an id, a list of ids, or none); none for moecli checkpoints."""
    if "format" in cfg:  # a moecli checkpoint
        return []
    eos = cfg.get("eos_token_id")
    try:
        eos = json.loads((directory / "generation_config.json").read_text()).get("eos_token_id", eos)
    except (OSError, ValueError, AttributeError):
        pass
    eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
    return [int(t) for t in eos if isinstance(t, int) and not isinstance(t, bool)]


def _load(checkpoint: str, dtype: str, sampling: Sampling, device: str = "cpu"):
    """(model, tokenizer, Stops) for generate and generate_prompts; the model on `device` (--device)."""
    ckpt, torch_dtype, dev = open_to_run(checkpoint, dtype, device)
    model, tok = ckpt.model_and_tokenizer(torch_dtype, dev)
    return model, tok, _stops(model, ckpt.config, ckpt.directory, sampling)


def _settings(s: Sampling, stop: Stops, model) -> dict:
    """The sampling settings a result reports."""
    dtype = dtype_name(next(model.parameters()).dtype)  # what auto resolved to
    return {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "dtype": dtype, "stop": stop.texts,
            "stop_tokens": stop.tokens, "device": str(model_device(model))}


def _stops(model, cfg: dict, directory: Path, s: Sampling) -> Stops:
    """--stop, --stop-token and, unless --ignore-eos, the model's end-of-sequence tokens (``eos_tokens``)."""
    vocab = model.recipe.model.vocab_size
    for t in s.stop_tokens:
        if not 0 <= t < vocab:
            raise UserError(f"--stop-token: {t} is not a token id of this model (0 to {vocab - 1})")
    eos = set() if s.ignore_eos else {t for t in eos_tokens(directory, cfg) if 0 <= t < vocab}
    return Stops(list(s.stops), sorted(set(s.stop_tokens) | eos))


def _sample(model, tok, prompts: list[list[int]], seeds: list[int], s: Sampling, stops: Stops,
            on_text: Callable[[str], None] | None = None) -> list[tuple[int, str, str]]:
    """Samples every row of one batch (``stream_prompts``); per row (new tokens, completion, finish reason:
    "stop" where a stop string (the completion cut before it) or a stop token (left out) ended it, else
    "length"). on_text, when given, receives the first row's text piece by piece as it comes. A row that
    stopped takes no more tokens, and the batch ends when every row has."""
    rows: list[list[int]] = [[] for _ in range(len(prompts) * s.num_samples)]
    watched = len(rows) if stops.texts else 1 if on_text is not None else 0  # rows decoded as they grow
    texts = [TextStream(tok) for _ in range(watched)]
    cuts = [StopText(stops.texts) for _ in range(watched)] if stops.texts else []
    stop_ids, done = set(stops.tokens), [False] * len(rows)

    def emit(r: int, piece: str) -> None:
        if cuts:
            piece = cuts[r].add(piece)
        if r == 0 and on_text is not None and piece:
            on_text(piece)

    for tokens in stream_prompts(model, prompts, s.max_new_tokens, s.temperature, s.top_k, seeds, s.top_p,
                                 num_samples=s.num_samples):
        for r, token in enumerate(tokens):
            if done[r]:
                continue
            if token in stop_ids:
                done[r] = True
                continue
            rows[r].append(token)
            if r < watched:
                emit(r, texts[r].push(token))
                done[r] = bool(cuts) and cuts[r].hit
        if all(done):
            break
    for r in range(watched):
        emit(r, texts[r].finish())
        if cuts and (piece := cuts[r].finish()) and r == 0 and on_text is not None:
            on_text(piece)
    return [(len(row), cuts[r].text if cuts else tok.decode(row), "stop" if done[r] else "length")
            for r, row in enumerate(rows)]


def generate(checkpoint: str, prompt: str, sampling: Sampling, dtype: str = "float32", device: str = "cpu",
             on_text: Callable[[str], None] | None = None) -> dict:
    """Sample a completion of `prompt` (sampling.num_samples of them, in one batch: "completions"), each
    ending before the first stop string or stop token (the model's end-of-sequence ones too, unless
    ignore_eos), or after max_new_tokens; on_text, when given, receives the first piece by piece as its
    tokens come (the pieces join to its "completion")."""
    sampling.check()
    model, tok, stop = _load(checkpoint, dtype, sampling, device)
    prompt_ids = tok.encode(prompt)
    if not prompt_ids:
        raise UserError("--prompt: empty prompt")
    samples = _sample(model, tok, [prompt_ids], [sampling.seed], sampling, stop, on_text)
    return {"prompt": prompt, **_completions(samples), "seed": sampling.seed, **_settings(sampling, stop, model)}


def _completions(samples: list[tuple[int, str, str]]) -> dict:
    """One prompt's result: its first completion, its token count and why it ended, and with several
    samples, all of them."""
    n, text, reason = samples[0]
    res = {"completion": text, "new_tokens": n, "finish_reason": reason}
    if len(samples) > 1:
        res["completions"] = [text for _, text, _ in samples]
        res["finish_reasons"] = [reason for _, _, reason in samples]
    return res


def read_prompts(src: str, jsonl_field: str = JSONL_FIELD) -> list[str]:
    """--prompts: one prompt per line of a text file, or of stdin for -; a .jsonl file's "text" (or
    jsonl_field) strings, for prompts with newlines in them. Blank lines are skipped; no prompt at all is
    bad input."""
    if is_jsonl(src):
        prompts = list(jsonl_docs(src, jsonl_field))
    else:
        try:
            text = sys.stdin.read() if src == "-" else Path(src).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise UserError(f"{src}: cannot read: {e.strerror}") from None
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{src}: no prompts (one per line, or a .jsonl file's \"{jsonl_field}\" fields)")
    return prompts


def generate_prompts(checkpoint: str, prompts: list[str], sampling: Sampling, dtype: str = "float32",
                     device: str = "cpu", batch_size: int = 8, source: str = "--prompts",
                     on_result: Callable[[int, dict], None] | None = None) -> dict:
    """Sample completions of many prompts, batch_size prompts (of similar token counts) at a time
    (``stream_prompts``): "results" holds, in the prompts' order, what ``generate`` gives for each prompt
    alone with sampling.seed + its index (the same tokens, beyond rounding). ``on_result(index, result)`` is called
    for each prompt as soon as its batch is done (in the order batches finish, not the prompts')."""
    sampling.check()
    check_at_least("--batch-size", batch_size, 1)
    model, tok, stop = _load(checkpoint, dtype, sampling, device)
    ids = [tok.encode(p) for p in prompts]
    for i, p in enumerate(ids):
        if not p:
            raise UserError(f"{source}: prompt {i + 1} is empty after tokenization")
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    results: list[dict] = [{} for _ in ids]
    n, seed = sampling.num_samples, sampling.seed
    for b in range(0, len(order), batch_size):
        batch = order[b: b + batch_size]
        samples = _sample(model, tok, [ids[i] for i in batch], [seed + i for i in batch], sampling, stop)
        for g, i in enumerate(batch):
            results[i] = {"prompt": prompts[i], **_completions(samples[g * n: (g + 1) * n]), "seed": seed + i}
            if on_result is not None:
                on_result(i, results[i])
    return {"results": results, "prompts": len(prompts), "batch_size": batch_size, "num_samples": n,
            **_settings(sampling, stop, model)}
