"""Incremental decoding with a KV cache (moe generate): the same logits and tokens as re-running the window."""

import pytest
import torch

from moecli.config import apply_overrides, load_recipe
from moecli.data.tokenizers import ByteTokenizer
from moecli.commands.generate import TextStream, pick, sample, stream
from moecli.model.transformer import KVCache, build_model
from moecli.errors import UserError

# dropless recipes covering the attention and routing variants: GQA, q/k norm per head (qwen3-moe), sigmoid
# scores with groups, bias and shared experts after a dense layer (deepseek-v3), interleaved dense/MoE
# with a shared expert (llama4), a dense model
RECIPES = ["mixtral", "qwen3-moe", "deepseek-v3", "llama4", "dense"]


def small(name, context=48):
    return build_model(apply_overrides(load_recipe(name), {"model.context": context, "model.n_layers": 2,
                                                              "train.seq_len": context}), seed=1)


@pytest.mark.parametrize("name", RECIPES)
def test_cached_logits_equal_the_full_forward(name):
    model = small(name).eval()
    tokens = torch.randint(0, model.recipe.model.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens).logits_BSV[0]
        cache = KVCache.empty(len(model.layers), 48)
        parts = [model(tokens[:, :17], cache).logits_BSV[0]]  # prefill
        parts += [model(tokens[:, i: i + 1], cache).logits_BSV[0] for i in range(17, 30)]  # one token at a time
        parts.append(model(tokens[:, 30:], cache).logits_BSV[0])  # several after a prefix: the offset mask
    assert cache.pos == 40 and all(layer.n == 40 for layer in cache.layers)
    # to rounding: the cached steps run products of other shapes than the full forward's
    torch.testing.assert_close(torch.cat(parts), full, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), pytest.raises(ValueError, match="exceed the context"):  # 40 + 9 > 48
        model(tokens[:, :9], cache)
    small_cache = KVCache.empty(len(model.layers), 20)  # buffers for 20 tokens, written in place
    with torch.no_grad():
        model(tokens[:, :20], small_cache)
        with pytest.raises(ValueError, match=r"20 \+ 1 tokens exceed its capacity \(20\)"):
            model(tokens[:, 20:21], small_cache)


@pytest.mark.parametrize("name", ["mixtral", "deepseek-v3"])
def test_generation_with_and_without_cache_gives_the_same_tokens(name):
    """Greedy and seeded sampling, past the context (48): the cache stops there and the window slides."""
    model = small(name)
    prompt = torch.randint(0, model.recipe.model.vocab_size, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    for temperature in (0.0, 1.0):
        cached = sample(model, prompt, 60, temperature, 0, seed=5, kv_cache=True)
        plain = sample(model, prompt, 60, temperature, 0, seed=5, kv_cache=False)
        assert len(cached) == 60 and cached == plain
    assert sample(model, prompt, 0, 1.0, 0, seed=5) == []
    long_prompt = prompt * 3  # longer than the context: no cache at all, the last 48 tokens each step
    assert sample(model, long_prompt, 5, 0.0, 0, 0) == sample(model, long_prompt, 5, 0.0, 0, 0, kv_cache=False)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe"])
def test_greedy_generation_matches_transformers(tmp_path, kind):
    """moecli's cached greedy decoding on a Hugging Face checkpoint gives the tokens transformers' generate gives
    (its own KV cache), 30 new tokens after an 8-token prompt, within the 64-token context."""
    pytest.importorskip("transformers")
    from support.hf_models import make

    from moecli.formats.checkpoint import load_checkpoint

    hf = make(kind, tmp_path / kind)
    ours, _ = load_checkpoint(tmp_path / kind)
    prompt = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=30, do_sample=False, min_new_tokens=30,
                             pad_token_id=0)[0, 8:].tolist()
    assert sample(ours, prompt[0].tolist(), 30, 0.0, 0, seed=0) == theirs


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    """Nucleus sampling over probabilities 0.5, 0.3, 0.15, 0.05: p = 0.7 keeps the first two (0.5 < 0.7 <= 0.8),
    p = 0.45 only the first, p = 1 all four; top-k applies first."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    gen = torch.Generator().manual_seed(0)

    def seen(**kw):
        return {t for _ in range(200) for t in pick(logits.expand(2, 4), 1.0, kw.get("top_k", 0), kw["top_p"], gen)}

    assert seen(top_p=0.7) == {0, 1}
    assert seen(top_p=0.45) == {0}
    assert seen(top_p=0.81) == {0, 1, 2}
    assert seen(top_p=1.0) == {0, 1, 2, 3}
    assert seen(top_p=0.81, top_k=2) == {0, 1}
    assert pick(logits[None], 0.0, 0, 0.1, gen) == [0]  # greedy ignores both


def test_text_stream_releases_whole_characters_and_joins_to_the_decoding():
    tok = ByteTokenizer()
    text = "héllo, wörld ✓ 🙂!"
    ids = tok.encode(text)
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.finish() == text
    assert sum(1 for p in pieces if p) == len(text)  # one piece per character, as soon as it is whole
    cut = TextStream(tok)  # a sample that ends inside a character: finish releases the replacement
    assert [cut.push(i) for i in ids[:2]] == ["h", ""] and cut.finish() == "\ufffd"


def test_generate_streams_what_json_reports(tmp_path, cli):
    """The printed stream is the prompt and the completion --json reports for the same seed; bfloat16 runs."""
    import json

    run = tmp_path / "m"
    assert cli("build", "mixtral", "-o", run, "--set", "model.n_layers=1", "--json").returncode == 0
    args = ("generate", run, "-p", "héllo ", "-n", "40", "--seed", "4", "--top-p", "0.9")
    as_json, printed = cli(*args, "--json"), cli(*args)
    assert as_json.returncode == 0 and printed.returncode == 0, printed.stderr
    res = json.loads(as_json.stdout)
    assert res["new_tokens"] == 40 and res["top_p"] == 0.9
    assert printed.stdout == "héllo " + res["completion"] + "\n"
    bf16 = cli(*args, "--dtype", "bfloat16", "--json")
    assert bf16.returncode == 0 and json.loads(bf16.stdout)["new_tokens"] == 40, bf16.stderr
    three = json.loads(cli(*args, "--num-samples", "3", "--json").stdout)
    assert len(three["completions"]) == 3 and three["completion"] == three["completions"][0]
    printed = cli(*args, "--num-samples", "3").stdout
    assert printed == "---\n".join("héllo " + c + "\n" for c in three["completions"])


def test_several_samples_in_one_batch():
    """--num-samples: greedy gives every row the single continuation; sampled rows differ from each other,
    and equal the uncached batch's (past the context too: the window then slides for all rows)."""
    model = small("mixtral")
    prompt = torch.randint(0, model.recipe.model.vocab_size, (20,), generator=torch.Generator().manual_seed(3)).tolist()

    def rows(n, temperature, kv_cache=True):
        steps = list(stream(model, prompt, 40, temperature, 0, 7, 1.0, kv_cache, num_samples=n))
        return [list(r) for r in zip(*steps)]

    greedy = sample(model, prompt, 40, 0.0, 0, seed=0)
    assert rows(3, 0.0) == [greedy] * 3
    sampled = rows(4, 1.0)
    assert len({tuple(r) for r in sampled}) == 4 and all(len(r) == 40 for r in sampled)
    assert sampled == rows(4, 1.0, kv_cache=False) and sampled == rows(4, 1.0)


@pytest.mark.parametrize("name", ["mixtral", "qwen3-moe", "llama4"])
def test_prompts_of_different_lengths_in_one_batch(name):
    """stream_prompts: each prompt of a batch (lengths 5, 20 and 11, 2 samples each) gets the tokens it gets
    alone with its own seed, greedy and sampled, cached and not, and past the context (48) as well; the cached
    batch's logits equal each prompt's alone (to rounding)."""
    from moecli.commands.generate import _prefill, stream_prompts

    model = small(name)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, model.recipe.model.vocab_size, (n,), generator=g).tolist() for n in (5, 20, 11)]
    seeds = [3, 8, 1]

    def batch(temperature, new, kv_cache=True):
        steps = list(stream_prompts(model, prompts, new, temperature, 0, seeds, 1.0, kv_cache, num_samples=2))
        return [list(r) for r in zip(*steps)]

    def alone(temperature, new):
        return [r for ids, s in zip(prompts, seeds)
                for r in [list(x) for x in zip(*stream(model, ids, new, temperature, 0, s, num_samples=2))]]

    for temperature in (0.0, 1.0):
        for new in (20, 45):  # 20 + 20 < 48 stays in the cache; 20 + 45 slides the windows
            got = batch(temperature, new)
            assert got == alone(temperature, new) and got == batch(temperature, new, kv_cache=False)
    assert len({tuple(r) for r in batch(1.0, 20)}) == 6  # the rows are sampled apart
    with torch.no_grad():  # masked prefill and one cached step, against each prompt's own window
        cache, logits = _prefill(model, prompts, 1, 30)
        assert cache.pos == 20 and cache.layers[0].pad_BL[:, :16].sum(1).tolist() == [15, 0, 9]
        twice, logits2 = _prefill(model, prompts, 2, 30)  # each prompt runs once; its second row is a copy
        assert torch.equal(logits2[::2], logits) and torch.equal(logits2[1::2], logits)
        assert all(torch.equal(a.k_BHLDh[::2], b.k_BHLDh) and torch.equal(a.v_BHLDh[1::2], b.v_BHLDh)
                   for a, b in zip(twice.layers, cache.layers))
        step = model(torch.tensor([[7], [7], [7]]), cache).logits_BSV[:, -1]
        for i, ids in enumerate(prompts):
            torch.testing.assert_close(logits[i], model(torch.tensor([ids])).logits_BSV[0, -1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(step[i], model(torch.tensor([ids + [7]])).logits_BSV[0, -1],
                                       rtol=1e-5, atol=1e-5)


def test_generate_many_prompts(tmp_path, cli):
    """--prompts: each prompt's completion is the one --prompt gives alone with seed + its index, in the file's
    order (text lines, stdin or .jsonl), in batches of any size, and so does --prompt given several times;
    bad lists are refused in one line."""
    import json

    from moecli.commands.generate import Sampling, generate, generate_prompts, read_prompts

    run = tmp_path / "m"
    assert cli("build", "mixtral", "-o", run, "--set", "model.n_layers=1", "--json").returncode == 0
    prompts = ["The cat sat", "It was a dark and stormy night, and", "Hé"]
    (tmp_path / "p.txt").write_text(prompts[0] + "\n\n" + prompts[1] + "\n" + prompts[2] + "\n")
    args = ("generate", run, "-n", "12", "--seed", "5", "--top-p", "0.9")
    res = json.loads(cli(*args, "--prompts", tmp_path / "p.txt", "--batch-size", "2", "--json").stdout)
    assert res["prompts"] == 3 and [r["prompt"] for r in res["results"]] == prompts
    for i, (p, r) in enumerate(zip(prompts, res["results"])):  # --prompt's defaults: temperature 0.8, top-k 50
        single = generate(str(run), p, Sampling(12, 0.8, 50, 5 + i, top_p=0.9))
        assert (r["completion"], r["new_tokens"], r["seed"]) == (single["completion"], 12, 5 + i)
    flags = json.loads(cli(*args, "-p", prompts[0], "-p", prompts[1], "--json").stdout)  # -p twice: batched too
    assert [r["completion"] for r in flags["results"]] == [r["completion"] for r in res["results"][:2]]
    one_batch = cli(*args, "--prompts", "-", "--batch-size", "8", input=(tmp_path / "p.txt").read_text())
    assert one_batch.stdout == "---\n".join(p + r["completion"] + "\n" for p, r in zip(prompts, res["results"]))
    # --jsonl: a line per prompt as its batch finishes; batches of similar lengths, the shortest first
    lines = cli(*args, "--prompts", tmp_path / "p.txt", "--batch-size", "2", "--jsonl").stdout.splitlines()
    assert [json.loads(line) for line in lines] == [{"index": i, **res["results"][i]} for i in (2, 0, 1)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in ["two\nlines", "x"]))
    two = json.loads(cli(*args, "--prompts", tmp_path / "p.jsonl", "--num-samples", "2", "--json").stdout)
    assert [r["prompt"] for r in two["results"]] == ["two\nlines", "x"]
    assert all(len(r["completions"]) == 2 for r in two["results"])
    (tmp_path / "blank.txt").write_text("\n \n")
    for bad, message in [(("--prompts", tmp_path / "blank.txt"), "blank.txt: no prompts"),
                         (("--prompts", tmp_path / "p.txt", "-p", "x"), "--prompts FILE, not both"),
                         ((), "give --prompt TEXT"),
                         (("-p", "-", "-p", "-"), "--prompt -: standard input can be read once"),
                         (("-p", "x", "--json", "--jsonl"), "give --json (one result at the end) or --jsonl")]:
        r = cli(*args, *bad)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    with pytest.raises(UserError, match="missing.txt: cannot read"):
        read_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="--batch-size: must be >= 1"):
        generate_prompts(str(run), prompts, Sampling(12, 0.8, 50, 5), batch_size=0)


def test_stop_text_cuts_before_the_stop_and_holds_back_what_may_begin_one():
    from moecli.commands.generate import StopText, parse_stops

    cut = StopText(["\n\n", "END"])
    # "c\n" holds its "\n" back (it may begin "\n\n"); "x\nE" then releases "\nx\n" and holds "E"
    assert [cut.add(p) for p in ["ab", "c\n", "x\nE", "N", "D!"]] == ["ab", "c", "\nx\n", "", ""]
    assert cut.hit and cut.text == "abc\nx\n" and cut.finish() == ""
    free = StopText(["\n\n"])
    assert [free.add(p) for p in ["a\n", "b\n"]] == ["a", "\nb"] and not free.hit and free.finish() == "\n"
    split = StopText(["ab"])  # a stop spread over three pieces
    assert [split.add(p) for p in ["x", "a", "b", "c"]] == ["x", "", "", ""] and split.text == "x"
    assert parse_stops(["\\n\\n", "a\\tb", "x\\\\n", "é\\q"]) == ["\n\n", "a\tb", "x\\n", "é\\q"]
    with pytest.raises(UserError, match="--stop: empty stop string"):
        parse_stops([""])


def printable_pair(text: str) -> str:
    """Two printable characters of a sampled text from its fifth on (an argument can hold no NUL byte)."""
    return next(text[i: i + 2] for i in range(4, len(text) - 1) if text[i: i + 2].isprintable())


def test_generate_stops_at_a_stop_string(tmp_path, cli):
    """--stop: the completion is the unstopped one cut before the stop string's first occurrence (printed
    the same as it streams), finish_reason "stop"; a stop never sampled leaves it whole ("length"); every
    sample and every prompt of a batch is cut on its own."""
    import json

    from moecli.commands.generate import Sampling, generate, generate_prompts

    run = tmp_path / "m"
    assert cli("build", "mixtral", "-o", run, "--set", "model.n_layers=1", "--json").returncode == 0
    whole = generate(str(run), "Once", Sampling(40, 0.0, 50, 2))
    text = whole["completion"]
    assert whole["finish_reason"] == "length" and len(text) > 12
    stop = printable_pair(text)
    args = ("generate", run, "-p", "Once", "-n", "40", "--seed", "2", "-t", "0")
    cut = json.loads(cli(*args, "--stop", stop, "--stop", "never sampled", "--json").stdout)
    assert cut["completion"] == text[: text.find(stop)] and cut["finish_reason"] == "stop"
    assert cut["new_tokens"] < 40 and cut["stop"] == [stop, "never sampled"]
    printed = cli(*args, "--stop", stop)
    assert printed.returncode == 0 and printed.stdout == "Once" + cut["completion"] + "\n", printed.stderr
    same = generate(str(run), "Once", Sampling(40, 0.0, 50, 2, stops=["never sampled"]))
    assert (same["completion"], same["finish_reason"]) == (text, "length")
    free = generate(str(run), "Once", Sampling(30, 0.8, 50, 5, num_samples=3))["completions"]
    stop = printable_pair(free[0])
    res = generate(str(run), "Once", Sampling(30, 0.8, 50, 5, num_samples=3, stops=[stop]))
    for full, got, reason in zip(free, res["completions"], res["finish_reasons"]):
        assert (got, reason) == ((full[: full.find(stop)], "stop") if stop in full else (full, "length"))
    many = generate_prompts(str(run), ["Once", "The cat"], Sampling(30, 0.8, 50, 5, stops=[stop]))["results"]
    for i, r in enumerate(many):
        alone = generate(str(run), r["prompt"], Sampling(30, 0.8, 50, 5 + i, stops=[stop]))
        assert (r["completion"], r["finish_reason"]) == (alone["completion"], alone["finish_reason"])


def test_stop_tokens_and_end_of_sequence(tmp_path, cli):
    """--stop-token: a row ends before the first time it samples that id (the id left out); a Hugging Face
    directory's end-of-sequence ids (generation_config.json over config.json) are stop tokens too, unless
    --ignore-eos; moecli checkpoints have none; an id outside the vocabulary is refused."""
    import json

    from moecli.formats.checkpoint import load_with_tokenizer
    from moecli.commands.generate import Sampling, _stops, eos_tokens, generate

    assert eos_tokens(tmp_path, {"eos_token_id": 2}) == [2]
    assert eos_tokens(tmp_path, {"eos_token_id": [2, 7]}) == [2, 7]
    assert eos_tokens(tmp_path, {"format": "moecli", "eos_token_id": 2}) == []
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 9]}))
    assert eos_tokens(tmp_path, {"eos_token_id": 2}) == [5, 9] and eos_tokens(tmp_path, {}) == [5, 9]
    run = tmp_path / "m"
    assert cli("build", "mixtral", "-o", run, "--set", "model.n_layers=1", "--json").returncode == 0
    model, cfg, directory, tok = load_with_tokenizer(run)
    greedy = sample(model, tok.encode("Once"), 40, 0.0, 0, seed=2)
    stop_id = greedy[12]
    k = greedy.index(stop_id)
    res = generate(str(run), "Once", Sampling(40, 0.0, 0, 2, stop_tokens=[stop_id]))
    assert (res["new_tokens"], res["finish_reason"], res["stop_tokens"]) == (k, "stop", [stop_id])
    assert res["completion"] == tok.decode(greedy[:k])
    assert generate(str(run), "Once", Sampling(40, 0.0, 0, 2))["completion"] == tok.decode(greedy)
    hf_like = {"eos_token_id": [stop_id, 10**6]}  # an end-of-sequence id past the vocabulary is ignored
    assert _stops(model, hf_like, tmp_path / "none", Sampling()).tokens == [stop_id]
    assert _stops(model, hf_like, tmp_path / "none", Sampling(stop_tokens=[3], ignore_eos=True)).tokens == [3]
    args = ("generate", run, "-p", "Once", "-n", "40", "--seed", "2", "-t", "0", "--json")
    got = json.loads(cli(*args, "--stop-token", str(stop_id)).stdout)
    assert (got["completion"], got["finish_reason"]) == (res["completion"], "stop")
    bad = cli(*args, "--stop-token", "256")
    assert bad.returncode == 2 and "--stop-token: 256 is not a token id of this model (0 to 255)" in bad.stderr
