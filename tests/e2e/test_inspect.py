"""moe inspect-routing: statistics against hand-computed routing, collapse flag, HF Mixtral parity, outputs."""

import json
import math

import pytest
import torch

from moecli.moe.router import RouterOutput
from moecli.commands.inspect_routing import LayerAcc, layer_report
from moecli.data.tokenizers import ByteTokenizer

from support.hf_models import make


def route(idx, weights, logits):
    logits = torch.tensor(logits, dtype=torch.float32)
    return RouterOutput(logits, torch.softmax(logits, -1), torch.tensor(idx), torch.tensor(weights), None)


def test_stats_hand_computed():
    # 4 tokens, E=4, K=2; token ids 65 'A', 66 'B', 65, 67
    idx = [[0, 1], [0, 2], [0, 1], [3, 0]]
    w = [[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.9, 0.1]]
    logits = [[0.0, 0.0, 0.0, 0.0]] * 4  # uniform scores: entropy = log 4, z = log 4
    acc = LayerAcc(4, 2, 256)
    acc.add(route(idx, w, logits), torch.tensor([65, 66, 65, 67]), capacity_factor=1.0)
    rep = layer_report(acc, ByteTokenizer(), top_tokens=2, near_dead=0.6, capacity_factor=1.0)
    # loads: e0 = 4, e1 = 2, e2 = 1, e3 = 1 -> mean 2
    assert [e["load"] for e in rep["experts"]] == [4, 2, 1, 1]
    assert rep["max_vio"] == pytest.approx(1.0)
    assert rep["cv"] == pytest.approx(math.sqrt(((4 - 2) ** 2 + 0 + 1 + 1) / 4) / 2)
    assert rep["entropy"] == pytest.approx(1.0)
    assert rep["z_mean"] == pytest.approx(math.log(4)) and rep["z_loss"] == pytest.approx(math.log(4) ** 2)
    assert rep["top1_gate_mean"] == pytest.approx((0.6 + 0.7 + 0.5 + 0.9) / 4)
    assert rep["experts"][0]["mean_gate"] == pytest.approx((0.6 + 0.7 + 0.5 + 0.1) / 4)
    assert rep["dead"] == [] and rep["near_dead"] == [2, 3]  # load_rel 0.5 < 0.6
    shares = [4 / 8, 2 / 8, 1 / 8, 1 / 8]
    assert rep["load_entropy"] == pytest.approx(-sum(s * math.log(s) for s in shares) / math.log(4))
    # capacity ceil(1.0*4*2/4) = 2: expert 0 wants 4 -> 2 dropped of 8
    assert rep["dropped_frac"] == pytest.approx(2 / 8)
    # co-activation: (0,1) twice, (0,2) once, (0,3) once
    co = rep["coactivation"]
    assert co[0][1] == 2 and co[1][0] == 2 and co[0][2] == 1 and co[0][3] == 1 and co[1][2] == 0
    top = rep["top_coactivation"][0]
    assert (top["a"], top["b"], top["p_b_given_a"]) == (1, 0, 1.0)
    # token 'A' (65) occurs twice and goes to 0 and 1 both times: P(0|A) = 1
    e0 = rep["experts"][0]
    assert e0["top_tokens"][0]["text"] == "A" and e0["top_tokens"][0]["p_expert_given_token"] == 1.0
    # vocab specialisation of expert 1: its tokens A, A, with P(1|A) = 1 -> 1.0
    assert rep["experts"][1]["vocab_specialization"] == pytest.approx(1.0)


def test_near_dead_threshold_strict(tmp_path):
    acc = LayerAcc(4, 1, 256)
    acc.add(route([[0], [0], [0], [1]], [[1.0]] * 4, [[0.0] * 4] * 4), torch.tensor([1, 2, 3, 4]), 0.0)
    rep = layer_report(acc, ByteTokenizer(), 3, 0.5, 0.0)
    assert rep["dead"] == [2, 3] and rep["near_dead"] == []
    assert rep["status"] == "imbalanced" and rep["dropped_frac"] is None


@pytest.fixture
def trained(tmp_path, tiny_recipe, cli):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"alpha beta {i} gamma delta\n" for i in range(400)))
    run = tmp_path / "run"
    r = cli("train", tiny_recipe(train={"max_steps": 4, "ckpt_interval": 2}), corpus, "-o", run, "-q")
    assert r.returncode == 0, r.stderr
    return run, corpus


def test_collapsed_router_is_flagged(tmp_path, trained, cli):
    from safetensors.torch import load_file, save_file
    run, corpus = trained
    ck = run / "checkpoint"
    sd = load_file(ck / "model.safetensors")
    for k in sd:
        if k.endswith("router.gate.weight"):
            sd[k] = torch.zeros_like(sd[k])
        if k.endswith("expert_bias"):
            sd[k] = torch.tensor([0.0, 5.0, 4.0, 0.0])  # every token -> experts 1 and 2
    save_file(sd, ck / "model.safetensors")
    r = cli("inspect-routing", run, corpus, "--json", "--max-tokens", "2000")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    for name, L in res["layers"].items():
        assert L["collapsed"] and L["status"] == "collapsed"
        assert L["dead"] == [0, 3]
        assert L["max_vio"] == pytest.approx(1.0)  # loads (0, T, T, 0): max/mean - 1 = 1
        assert res["flagged"][name] == "collapsed"
    r = cli("inspect-routing", run, corpus, "--max-tokens", "2000")
    assert r.returncode == 0 and "collapsed" in r.stdout and "flagged layers" in r.stderr


def test_domains_saturation_svg(tmp_path, trained, cli):
    run, corpus = trained
    code = tmp_path / "code.txt"
    code.write_text("def f(x):\n    return x * 2\n" * 80)
    svg = tmp_path / "report.svg"
    r = cli("inspect-routing", run, corpus, "--json", "--max-tokens", "3000", "--domain", f"prose={corpus}",
            "--domain", f"code={code}", "--compare", run, "--svg", svg)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    for layer, doms in res["domains"].items():
        assert set(doms) == {"prose", "code"}
        assert sum(doms["code"]["share"]) == pytest.approx(1.0)
    assert all(v["topk_overlap"] == 1.0 for v in res["saturation"]["layers"].values())
    assert svg.read_text().lstrip().startswith("<svg")
    r = cli("inspect-routing", run, corpus, "--domain", "nofile")
    assert r.returncode == 2 and "expected NAME=FILE" in r.stderr
    r = cli("inspect-routing", run, corpus, "--layer", "7")
    assert r.returncode == 2 and "not an MoE layer" in r.stderr


def test_no_data_reads_the_validation_split_and_short_text_is_one_window(tmp_path, trained, cli):
    run, corpus = trained
    text = corpus.read_bytes()  # byte tokenizer, one file: the validation split is the corpus's last bytes
    train_cfg = json.loads((run / "checkpoint" / "config.json").read_text())["recipe"]["train"]
    n_val = max(int(len(text) * train_cfg["val_fraction"]), train_cfg["seq_len"] + 1)
    tail = tmp_path / "tail.txt"
    tail.write_bytes(text[-n_val:])
    r = cli("inspect-routing", run, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["data"] == f"validation split of {run}"
    ref = json.loads(cli("inspect-routing", run, tail, "--json").stdout)
    assert res["tokens"] == ref["tokens"] > 0 and res["layers"] == ref["layers"]
    short = cli("inspect-routing", run, "-", "--json", input="alpha beta 7")  # 12 tokens < the recipe's 32
    assert short.returncode == 0, short.stderr
    assert (json.loads(short.stdout)["tokens"], json.loads(short.stdout)["seq_len"]) == (12, 12)
    r = cli("inspect-routing", run, "-", "--seq-len", "32", input="alpha beta 7")
    assert r.returncode == 2 and r.stderr.strip() == "error: -: only 12 tokens; need at least --seq-len 32"


def test_saturation_between_different_checkpoints(tmp_path, trained, cli):
    run, corpus = trained
    r = cli("upcycle", run, "-o", tmp_path / "x")  # a trained MoE is not upcycled
    assert r.returncode == 2
    other = tmp_path / "other"
    r = cli("train", "-o", run, "--resume", "--max-steps", "30", "-q", "--set", "train.lr=0.02")
    assert r.returncode == 0, r.stderr
    import shutil
    shutil.copytree(run / "checkpoint", other)
    r = cli("train", "-o", run, "--resume", "--max-steps", "60", "-q", "--set", "train.lr=0.02")
    assert r.returncode == 0, r.stderr
    r = cli("inspect-routing", run, corpus, "--json", "--compare", other, "--max-tokens", "3000")
    res = json.loads(r.stdout)
    overlaps = [v["topk_overlap"] for v in res["saturation"]["layers"].values()]
    assert all(0 <= o <= 1 for o in overlaps) and min(overlaps) < 1.0


def _char_tokenizer(path, vocab):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz .,\n"))[: vocab]
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)} | {"[UNK]": len(chars)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.save(str(path))


def test_hf_mixtral_routing_matches_transformers(tmp_path, cli):
    pytest.importorskip("transformers")
    d = tmp_path / "mixtral"
    hf = make("mixtral", d)
    _char_tokenizer(d / "tokenizer.json", 90)
    from moecli.formats.checkpoint import load_checkpoint
    from moecli.commands.inspect_routing import Stream, run_routing
    ours, _ = load_checkpoint(d)
    x = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = hf(x, output_router_logits=True)
    _, kept = run_routing(ours, Stream(x.reshape(-1), 16), batch_size=2, capacity_factor=0.0, keep_idx=True)
    for layer, hf_logits in enumerate(out.router_logits):
        hf_top = hf_logits.float().topk(2, dim=-1).indices
        assert torch.equal(torch.cat(kept[layer]), hf_top)
    for i, moe in ours.moe_layers:
        moe.capture = True
    with torch.no_grad():
        ours(x)
    for (i, moe), hf_logits in zip(ours.moe_layers, out.router_logits):
        torch.testing.assert_close(moe.last_route.logits_TE, hf_logits.float(), rtol=1e-5, atol=1e-5)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog.\n" * 20)
    r = cli("inspect-routing", d, text, "--json", "--seq-len", "32")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert set(res["layers"]) == {"0", "1"} and res["layers"]["0"]["experts_n"] == 4
    assert any(t["text"] for e in res["layers"]["0"]["experts"] for t in e["top_tokens"])


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "llama", "qwen2", "qwen3"])
def test_hf_checkpoints_load_with_equal_logits_and_routing(tmp_path, kind):
    """moecli's model on a Hugging Face checkpoint: same logits, and same router logits/top-k for MoE ones."""
    pytest.importorskip("transformers")
    from moecli.formats.checkpoint import load_checkpoint
    d = tmp_path / kind
    hf = make(kind, d)
    ours, _ = load_checkpoint(d)
    x = torch.randint(0, 96, (2, 19), generator=torch.Generator().manual_seed(5))
    for _, moe in ours.moe_layers:
        moe.capture = True
    with torch.no_grad():
        ref = hf(x, output_router_logits=bool(ours.moe_layers)) if ours.moe_layers else hf(x)
        got = ours(x).logits_BSV
    torch.testing.assert_close(got, ref.logits, rtol=0, atol=1e-4)
    for (i, moe), hf_router in zip(ours.moe_layers, getattr(ref, "router_logits", None) or []):
        torch.testing.assert_close(moe.last_route.logits_TE, hf_router.float(), rtol=1e-5, atol=1e-5)
        assert torch.equal(moe.last_route.idx_TK, hf_router.float().topk(moe.cfg.top_k, -1).indices)


def test_bfloat16_routing_is_close_to_fp32(trained, cli):
    """--dtype bfloat16 (weights and compute; the router's product in fp32): each expert's share of the
    assignments within 0.05 of fp32's; the checkpoint compared with itself in bf16 routes identically."""
    run, corpus = trained
    args = ("inspect-routing", run, corpus, "--json", "--max-tokens", "3000")
    f32 = json.loads(cli(*args).stdout)
    r = cli(*args, "--dtype", "bfloat16", "--compare", run)
    assert r.returncode == 0, r.stderr
    bf = json.loads(r.stdout)
    assert (bf["dtype"], f32["dtype"]) == ("bfloat16", "float32") and bf["tokens"] == f32["tokens"]
    for name, layer in f32["layers"].items():
        shares = [(a["share"], b["share"]) for a, b in zip(layer["experts"], bf["layers"][name]["experts"])]
        assert len(shares) == 4 and max(abs(a - b) for a, b in shares) < 0.05
    assert all(v["topk_overlap"] == 1.0 for v in bf["saturation"]["layers"].values())
    r = cli(*args, "--dtype", "half")
    assert r.returncode == 2 and r.stderr.strip() == "error: --dtype: one of float32, bfloat16, got 'half'"


def test_read_tokens_joins_sources_as_training_does(tmp_path):
    """inspect-routing's reader: the sources joined by a newline, as encode_to_file (train, eval) joins them."""
    from moecli.data.tokenizers import ByteTokenizer
    from moecli.data.tokens import encode_to_file, open_tokens
    from moecli.data.tokens import read_tokens

    a, b = tmp_path / "a.txt", tmp_path / "b.jsonl"
    a.write_text("alpha beta")
    b.write_text('{"text": "gamma"}\n{"text": "delta"}\n')
    tok = ByteTokenizer()
    n = encode_to_file([a, b], tok, tmp_path / "t.bin")
    assert read_tokens([str(a), str(b)], tok, 1000).tolist() == open_tokens(tmp_path / "t.bin", n, 256).tolist()
    assert bytes(read_tokens([str(a), str(b)], tok, 1000).tolist()) == b"alpha beta\ngamma\ndelta"
    assert read_tokens([str(a), str(b)], tok, 7).tolist() == list(b"alpha b")


def test_domain_specs_are_checked_before_any_work():
    from moecli.errors import UserError
    from moecli.commands.inspect_routing import inspect_routing, parse_domains

    assert parse_domains(["code=a.py", "prose=dir/b=c.txt"]) == {"code": "a.py", "prose": "dir/b=c.txt"}
    for specs, message in [(["=a.txt"], "expected NAME=FILE"), (["a="], "expected NAME=FILE"),
                           (["x=a.txt", "x=b.txt"], "the name 'x' is given twice")]:
        with pytest.raises(UserError, match=message):
            parse_domains(specs)
        # refused before the checkpoint is even read (this one does not exist)
        with pytest.raises(UserError, match=message):
            inspect_routing("no-such-checkpoint", [], domains=specs)


def test_hf_model_is_scored_on_windows_of_its_own_context(tmp_path, cli):
    """A Hugging Face checkpoint's eval and inspect-routing windows are its context up to 2048 tokens (stated
    in the output), not the 128 of a recipe's training length; the loss is transformers' own on those windows.
    A moecli checkpoint keeps its training length."""
    pytest.importorskip("transformers")
    d = tmp_path / "mixtral"
    hf = make("mixtral", d, vocab_size=256, max_position_embeddings=4096)  # bytes: the default tokenizer
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(torch.randint(97, 123, (4200,), generator=torch.Generator().manual_seed(1)).tolist()))
    r = cli("eval", d, text, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert (res["seq_len"], res["windows"], res["batch_size"]) == (2048, 2, 1)
    assert res["seq_len_from"] == "the model's context (4096) capped at 2048"
    ids = torch.tensor(list(text.read_bytes()))
    with torch.no_grad():
        losses = [hf(ids[s: s + 2049][None], labels=ids[s: s + 2049][None]).loss for s in (0, 2048)]
    assert res["loss"] == pytest.approx(float(sum(losses) / 2), rel=1e-5)
    r = cli("eval", d, text)
    assert "windows of 2048: the model's context (4096) capped at 2048" in r.stdout
    r = cli("inspect-routing", d, text, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert (res["seq_len"], res["tokens"], res["seq_len_from"]) == (2048, 4096, "the model's context (4096) capped at 2048")
    short = make("mixtral", tmp_path / "short", vocab_size=256, max_position_embeddings=1000)
    del short
    res = json.loads(cli("eval", tmp_path / "short", text, "--json").stdout)
    assert (res["seq_len"], res["seq_len_from"], res["batch_size"]) == (1000, "the model's context (1000)", 2)


def test_moecli_checkpoint_keeps_its_training_window(trained, cli):
    run, corpus = trained
    for cmd in ("eval", "inspect-routing"):
        res = json.loads(cli(cmd, run, corpus, "--json").stdout)
        assert (res["seq_len"], res["seq_len_from"]) == (32, "the recipe's train.seq_len")
