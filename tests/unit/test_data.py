"""Data inputs: files, directories, globs, stdin; streaming tokenisation; corrupt inputs."""

import json
import os

import pytest
import torch

from moecli.data import corpus, tokens as data_mod
from moecli.data.tokenizers import ByteTokenizer
from moecli.data.tokens import encode_to_file, open_tokens, prepare_tokens
from moecli.data.corpus import expand_data_args
from moecli.errors import UserError


def test_expand_files_dirs_globs(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("b")
    (tmp_path / "d" / "sub" / "a.txt").write_text("a")
    (tmp_path / "d" / ".hidden").write_text("h")
    (tmp_path / "x.md").write_text("x")
    got = expand_data_args([str(tmp_path / "d"), str(tmp_path / "*.md"), "-"])
    assert [str(p) if p != "-" else p for p in got] == [str(tmp_path / "d" / "b.txt"),
                                                        str(tmp_path / "d" / "sub" / "a.txt"),
                                                        str(tmp_path / "x.md"), "-"]
    with pytest.raises(UserError, match="glob matches no files"):
        expand_data_args([str(tmp_path / "*.nothing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="directory holds no files"):
        expand_data_args([str(tmp_path / "empty")])


def test_byte_tokens_are_the_file_bytes_memory_mapped(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "CHUNK", 7)  # stream in tiny chunks
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("héllo wörld " * 50)
    b.write_text("second file")
    n = encode_to_file([a, b], ByteTokenizer(), tmp_path / "t.bin")
    expected = a.read_bytes() + b"\n" + b.read_bytes()
    assert n == len(expected)
    toks = open_tokens(tmp_path / "t.bin", n, 256)
    assert bytes(toks.tolist()) == expected


class _CharTok:
    """A text tokenizer stand-in: one id per character (checks chunked UTF-8 decoding)."""
    kind = "hf"
    vocab_size = 70000
    path = None

    def encode(self, text):
        return [ord(c) for c in text]

    def to_config(self):
        return {"type": "test"}


def test_chunked_text_decoding_never_splits_characters(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "CHUNK", 3)  # cuts through multi-byte characters
    text = "añ€😀z" * 40
    p = tmp_path / "u.txt"
    p.write_text(text, encoding="utf-8")
    n = encode_to_file([p], _CharTok(), tmp_path / "u.bin")
    assert open_tokens(tmp_path / "u.bin", n, 70000).tolist() == [ord(c) for c in text]


def test_token_cache_reused_and_rebuilt(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("abcdefgh" * 500)
    cache = tmp_path / "cache"
    d1 = prepare_tokens([str(f)], ByteTokenizer(), cache, 0.1, 16)
    mtime = (cache / "tokens.bin").stat().st_mtime_ns
    d2 = prepare_tokens([str(f)], ByteTokenizer(), cache, 0.1, 16)
    assert d1.fingerprint == d2.fingerprint and (cache / "tokens.bin").stat().st_mtime_ns == mtime
    f.write_text("changed " * 600)
    d3 = prepare_tokens([str(f)], ByteTokenizer(), cache, 0.1, 16)
    assert d3.fingerprint != d1.fingerprint
    assert d3.n_train + d3.n_val == len("changed " * 600) and len(d3.train) == len(d3.val) == 1


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, cli):
    out = tmp_path / "ck"
    assert cli("build", "mixtral", "-o", out, "--set", "model.n_layers=1").returncode == 0
    st = out / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    r = cli("info", out)
    assert r.returncode == 2 and "model.safetensors: not a readable safetensors file" in r.stderr
    assert "Traceback" not in r.stderr
    (out / "config.json").write_text("{oops")
    r = cli("eval", out, st)
    assert r.returncode == 2 and "config.json: cannot read JSON" in r.stderr
    (out / "config.json").write_text(json.dumps({"format": "moecli-checkpoint", "recipe": {"moe": {"top_k": "x"}}}))
    r = cli("generate", out, "--prompt", "hi")
    assert r.returncode == 2 and "moe.top_k: must be an integer" in r.stderr


def test_info_on_recipe_and_environment(cli):
    r = cli("info", "deepseek-v3", "--json")
    assert r.returncode == 0
    res = json.loads(r.stdout)
    assert res["moe_layers"] == [1, 2, 3] and res["params"]["active"] < res["params"]["total"]
    r = cli("info", "--json")
    assert "mixtral" in json.loads(r.stdout)["recipes"]
    r = cli("info", "nope-nothing")
    assert r.returncode == 2 and "no such checkpoint directory or recipe" in r.stderr


def test_info_on_a_hugging_face_directory(tmp_path, cli):
    pytest.importorskip("transformers")
    from support.hf_models import make

    from moecli.formats.checkpoint import load_checkpoint
    from moecli.model.params import parameter_report

    make("qwen2_moe", tmp_path / "hf")
    from safetensors.torch import load_file
    r = cli("info", tmp_path / "hf", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["params"] == parameter_report(load_checkpoint(tmp_path / "hf")[0])
    saved = load_file(tmp_path / "hf" / "model.safetensors")
    assert res["weights"]["tensors"] == len(saved) and res["weights"]["files"] == 1


def test_jsonl_documents_are_the_text_fields(tmp_path, tiny_recipe, cli):
    """A .jsonl file: each line's "text" is a document, documents joined by newlines (as files are); the
    same tokens and loss as the equivalent plain text; a bad line is named with its number, exit 2."""
    docs = ["First document, ünïcode too.", "Second one\nspans two lines.", "Third."]
    jl = tmp_path / "docs.jsonl"
    jl.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" + ("\n" if i == 0 else "") for i, d in
                          enumerate(docs)))  # a blank line too
    txt = tmp_path / "docs.txt"
    txt.write_text("\n".join(docs))
    tok = ByteTokenizer()
    n1 = encode_to_file([str(jl), str(txt)], tok, tmp_path / "a.bin")
    n2 = encode_to_file([str(txt), str(txt)], tok, tmp_path / "b.bin")
    assert n1 == n2 and (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    fingerprint = data_mod._fingerprint([jl], tok)  # a token cache records how the .jsonl file was read
    assert data_mod._fingerprint([jl], tok, "body") != fingerprint
    ckpt = tmp_path / "ckpt"
    assert cli("build", tiny_recipe(), "-o", ckpt).returncode == 0
    a, b = (json.loads(cli("eval", ckpt, f, "--json").stdout)["loss"] for f in (jl, txt))
    assert a == b
    for line, message in [('{"text": 3}', 'no "text" string field'), ("not json", "not JSON (Expecting value)"),
                          ('["text"]', "an array, not a JSON object"), ('"text"', "a string, not a JSON object")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
        r = cli("train", tiny_recipe(), bad, "-o", tmp_path / "run")
        assert r.returncode == 2 and r.stderr.startswith(f"error: {bad}:2: {message}"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_jsonl_field_names_another_text_field(tmp_path, tiny_recipe, cli):
    """--jsonl-field content: the documents are each line's "content" (eval gives the plain text's loss, as
    does inspect-routing's reader); without it the error names the line's keys; a run trained on one field
    refuses to resume on another (its token cache records the field); --prompts reads that field too."""
    from moecli.commands.evaluate import evaluate
    from moecli.commands.generate import read_prompts
    from moecli.data.tokens import read_tokens
    from moecli.training.setup import TrainArgs
    from moecli.training.trainer import train

    docs = ["alpha beta gamma " * 8, "delta\nepsilon " * 8]
    jl = tmp_path / "code.jsonl"
    jl.write_text("".join(json.dumps({"path": f"f{i}.py", "content": d}) + "\n" for i, d in enumerate(docs)))
    txt = tmp_path / "code.txt"
    txt.write_text("\n".join(docs))
    tok = ByteTokenizer()
    assert bytes(read_tokens([str(jl)], tok, 10**6, "content").tolist()) == txt.read_bytes()
    assert read_prompts(str(jl), "content") == docs
    ckpt = tmp_path / "ckpt"
    assert cli("build", tiny_recipe(), "-o", ckpt).returncode == 0
    a = json.loads(cli("eval", ckpt, jl, "--jsonl-field", "content", "--json").stdout)["loss"]
    assert a == evaluate(str(ckpt), [str(txt)], None, 16, None)["loss"]
    r = cli("eval", ckpt, jl)
    assert r.returncode == 2 and r.stderr.strip() == (
        f'error: {jl}:1: no "text" string field in this line\'s JSON object (its keys: path, content; '
        "--jsonl-field names the text's)")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"content": "some words " * 40, "text": "other words " * 40}) + "\n"
                              for _ in range(20)))
    run = tmp_path / "run"
    recipe = str(tiny_recipe(train={"max_steps": 2, "eval_interval": 2, "ckpt_interval": 2}))
    train(TrainArgs(recipe, [str(corpus)], run, quiet=True, jsonl_field="content"))
    with pytest.raises(UserError, match="training data changed since the checkpoint"):  # "text": other tokens
        train(TrainArgs(None, [str(corpus)], run, {"train.max_steps": 3}, resume=True, quiet=True))
    res = train(TrainArgs(None, [str(corpus)], run, {"train.max_steps": 3}, resume=True, quiet=True,
                          jsonl_field="content"))
    assert res["final_step"] == 3


def test_sample_mixed_draws_each_source_by_its_weight():
    """--data-weights: each row comes whole from one stream, streams drawn in proportion to their weights; the
    same seed gives the same batch; one stream gives sample_batch's windows."""
    ones, twos = torch.ones(500, dtype=torch.uint8), torch.full((80,), 2, dtype=torch.uint8)
    x, y = data_mod.sample_mixed([ones, twos], [0.75, 0.25], 4000, 16, torch.Generator().manual_seed(3))
    xy = torch.cat([x, y[:, -1:]], dim=1)
    assert ((xy == 1).all(1) | (xy == 2).all(1)).all()  # no window crosses from one stream into the other
    share = float((xy[:, 0] == 1).float().mean())
    assert 0.73 < share < 0.77
    again = data_mod.sample_mixed([ones, twos], [0.75, 0.25], 4000, 16, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], x)
    stream = torch.arange(300, dtype=torch.int64)
    one = data_mod.sample_mixed([stream], [1.0], 8, 16, torch.Generator().manual_seed(5))
    ref = data_mod.sample_batch(stream, 8, 16, torch.Generator().manual_seed(5))
    assert torch.equal(one[0], ref[0]) and torch.equal(one[1], ref[1])


def test_parts_hold_out_each_sources_tail_and_come_back_from_the_cache(tmp_path):
    """prepare_tokens(parts=True): each DATA argument (here a directory of two files, and a file) is one part;
    its training stream and held-out tail are its own tokens, in order. The cache records the parts, so a
    resumed run (cached fingerprint, no DATA) gets them back; the same files as one stream are another cache."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "1.txt").write_text("first " * 100)
    (tmp_path / "d" / "2.txt").write_text("second " * 100)
    (tmp_path / "f.txt").write_text("third part " * 40)
    args, cache = [str(tmp_path / "d"), str(tmp_path / "f.txt")], tmp_path / "cache"
    mixed = prepare_tokens(args, ByteTokenizer(), cache, 0.1, 16, parts=True)
    assert mixed.sources == args
    texts = [("first " * 100 + "\n" + "second " * 100).encode(), ("third part " * 40).encode()]
    for train, val, text in zip(mixed.train, mixed.val, texts):
        assert bytes(torch.cat([train, val]).tolist()) == text
        assert val.numel() == max(int(len(text) * 0.1), 17)
    again = prepare_tokens([], ByteTokenizer(), cache, 0.1, 16, mixed.fingerprint)
    assert again.sources == args and all(torch.equal(a, b) for a, b in zip(again.train + again.val,
                                                                            mixed.train + mixed.val))
    joined = prepare_tokens(args, ByteTokenizer(), tmp_path / "cache2", 0.1, 16)
    assert joined.fingerprint != mixed.fingerprint and len(joined.train) == 1 and joined.sources == []
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(UserError, match=r"short.txt: only 4 tokens; need at least 34 for training and validation"):
        prepare_tokens([args[1], str(tmp_path / "short.txt")], ByteTokenizer(), tmp_path / "c3", 0.1, 16, parts=True)


def test_a_pipe_is_data_read_once(tmp_path, tiny_recipe, cli):
    """bash's <(command) and named FIFOs are neither files nor directories: every command refused them as
    "no such file or directory". They are read once, like stdin, and their tokens are never taken from a
    cache made for an earlier pipe at the same path."""
    import shutil
    import subprocess
    import sys

    text = "The quick brown fox jumps over the lazy dog. " * 300
    (tmp_path / "c.txt").write_text(text)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def feed(content):  # a writer that blocks until the reader opens the FIFO
        return subprocess.Popen([sys.executable, "-c", f"open({str(fifo)!r}, 'w').write({content!r})"])

    writer = feed(text)
    cache = tmp_path / "cache"
    d1 = prepare_tokens([str(fifo)], ByteTokenizer(), cache, 0.1, 16)
    writer.wait()
    assert d1.n_train + d1.n_val == len(text)
    writer = feed(text[::-1])  # the same path, other text: tokenised again
    d2 = prepare_tokens([str(fifo)], ByteTokenizer(), cache, 0.1, 16)
    writer.wait()
    assert d2.fingerprint != d1.fingerprint
    assert bytes(d2.train[0][:20].tolist()) == text[::-1][:20].encode()

    # through the shell, as users write it: eval scores a pipe as it scores the file
    if shutil.which("bash") is None:
        pytest.skip("no bash for <(command)")
    ckpt = tmp_path / "ckpt"
    assert cli("train", tiny_recipe(), tmp_path / "c.txt", "-o", ckpt).returncode == 0
    moe = f"{sys.executable} -m moecli.cli"
    piped = subprocess.run(["bash", "-c", f"{moe} eval {ckpt} <(cat {tmp_path / 'c.txt'}) --json"],
                           capture_output=True, text=True)
    assert piped.returncode == 0, piped.stderr
    from_file = cli("eval", ckpt, tmp_path / "c.txt", "--json")
    assert json.loads(piped.stdout)["loss"] == json.loads(from_file.stdout)["loss"]


def test_compressed_text_reads_as_the_plain_text(tmp_path):
    """.gz, .bz2 and .xz sources (and .jsonl.gz as JSON Lines) give the plain file's tokens; a damaged one is one
    line naming it; .zst without the zstandard package names the install that fixes it."""
    import bz2
    import gzip
    import lzma

    from moecli.data.corpus import text_pieces
    from moecli.errors import UserError

    text = "".join(f"compressed line {i} \u00e9\u4e2d\n" for i in range(3000))
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    for name, codec in (("a.txt.gz", gzip), ("a.txt.bz2", bz2), ("a.txt.xz", lzma)):
        (tmp_path / name).write_bytes(codec.compress(text.encode()))
        assert "".join(text_pieces(tmp_path / name)) == text, name
    docs = "".join(json.dumps({"text": t}) + "\n" for t in ("first doc", "second doc"))
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(docs.encode()))
    assert "".join(text_pieces(tmp_path / "d.jsonl.gz")) == "first doc\nsecond doc"
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="bad.gz: not a readable gzip file"):
        "".join(text_pieces(tmp_path / "bad.gz"))
    try:
        import zstandard  # noqa: F401
    except ImportError:
        (tmp_path / "a.zst").write_bytes(b"\x28\xb5\x2f\xfd")
        with pytest.raises(UserError, match="pip install zstandard"):
            "".join(text_pieces(tmp_path / "a.zst"))
