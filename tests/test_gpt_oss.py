"""GPT-OSS (gpt_oss) against transformers: tiny random GptOssForCausalLM checkpoints with non-zero attention sinks
and biases, alternating sliding-window (6 tokens) and full layers, YaRN past its original 16 positions, experts
with biases and the clamped SwiGLU (a limit of 1, so the clamps bite), the biased router."""

import json

import pytest
import torch

from hf_models import make

from moecli.checkpoint import load_checkpoint

transformers = pytest.importorskip("transformers")
LONG = {"max_position_embeddings": 128}


def assert_same_routing(hf, ours, x, rel=1e-5):
    """Logits to ``rel`` of the largest; per layer the same experts with the same weights (mlp.router returns
    (logits, top-k softmax weights, indices))."""
    theirs = {}
    for i, layer in enumerate(hf.model.layers):
        layer.mlp.router.register_forward_hook(lambda mod, a, out, i=i: theirs.__setitem__(i, out))
    for _, moe in ours.moe_layers:
        moe.capture = True
    with torch.no_grad():
        ref, got = hf(x).logits, ours(x).logits_BSV
    assert (got - ref).abs().max() <= rel * ref.abs().max()
    for i, moe in ours.moe_layers:
        _, weight_TK, idx_TK = theirs[i]
        route = moe.last_route
        assert torch.equal(route.idx_TK.sort(-1).values, idx_TK.sort(-1).values)
        torch.testing.assert_close(route.weight_TK.gather(1, route.idx_TK.argsort(-1)),
                                   weight_TK.gather(1, idx_TK.argsort(-1)).float(), rtol=1e-5, atol=1e-6)


def test_logits_and_router_choices_equal_transformers(tmp_path):
    hf = make("gpt_oss", tmp_path, vocab_size=256, **LONG)
    ours, _ = load_checkpoint(tmp_path)
    r = ours.recipe
    assert (r.model.layer_types, r.model.sliding_window, r.model.attention_sinks, r.moe.expert_act) == (
        ["sliding", "full"], 6, True, "clamped_swiglu")
    assert hf.model.layers[0].self_attn.sinks.abs().min() > 0 and hf.model.layers[0].mlp.router.bias.abs().min() > 0
    x = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(3))  # past the window and YaRN's 16
    assert_same_routing(hf, ours, x)


def test_cached_greedy_tokens_equal_transformers(tmp_path):
    """Decoding attends over the sliding window of the cache (and the sinks) as transformers' cache does."""
    from moecli.generate import sample

    hf = make("gpt_oss", tmp_path, vocab_size=256, **LONG)
    ours, _ = load_checkpoint(tmp_path)
    prompt = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)[0, 20:]
    assert sample(ours, prompt[0].tolist(), 40, 0.0, 0, seed=0) == theirs.tolist()
    assert sample(ours, prompt[0].tolist(), 40, 0.0, 0, seed=0, kv_cache=False) == theirs.tolist()


def test_init_train_export_round_trip(tmp_path, cli):
    """train --init 2 steps, export as gpt_oss: transformers loads GptOssForCausalLM with moecli's loss (sinks and
    every bias trained); eval, inspect-routing and info read both."""
    d = tmp_path / "oss"
    make("gpt_oss", d, vocab_size=256, **LONG)
    text = tmp_path / "t.txt"
    text.write_text("".join(f"{i} sinks take the attention nobody needs\n" for i in range(200)))
    r = cli("train", "--init", d, text, "-o", tmp_path / "run", "--max-steps", "2", "--batch-size", "4", "--seq-len",
            "64", "--set", "train.lr=1e-2", "-q")
    assert r.returncode == 0, r.stderr
    r = cli("export", tmp_path / "run", "-o", tmp_path / "hf", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["format"] == "gpt_oss" and out["max_abs_logit_diff"] < 1e-4
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["layer_types"][:2] == ["sliding_attention", "full_attention"] and cfg["sliding_window"] == 6
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    before = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    assert type(back).__name__ == "GptOssForCausalLM"
    assert not torch.equal(back.model.layers[0].self_attn.sinks, before.model.layers[0].self_attn.sinks)
    assert not torch.equal(back.model.layers[0].mlp.experts.gate_up_proj_bias,
                           before.model.layers[0].mlp.experts.gate_up_proj_bias)
    ours, _ = load_checkpoint(tmp_path / "run")
    x = torch.tensor(list(text.read_bytes()[:101]))[None]
    with torch.no_grad():
        theirs = back(x, labels=x).loss
        mine = torch.nn.functional.cross_entropy(ours(x).logits_BSV[0, :-1], x[0, 1:])
    assert float(theirs) == pytest.approx(float(mine), rel=1e-5)
    for cmd in (("eval", tmp_path / "hf", text), ("inspect-routing", tmp_path / "hf", text), ("info", tmp_path / "hf"),
                ("info", d)):
        r = cli(*cmd, "--json")
        assert r.returncode == 0, (cmd, r.stderr)


def test_mxfp4_checkpoint_is_refused_in_one_line(tmp_path, cli):
    make("gpt_oss", tmp_path, vocab_size=256)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = cli("info", tmp_path)
    assert r.returncode == 2 and "mxfp4" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_gpt_oss_recipe_trains_and_exports(tmp_path, cli):
    r = cli("train", "gpt-oss", "-o", tmp_path / "run", "--max-steps", "3", "--batch-size", "4", "--seq-len", "64",
            "-q")
    assert r.returncode == 0, r.stderr
    r = cli("export", tmp_path / "run", "-o", tmp_path / "hf", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["architecture"] == "GptOssForCausalLM"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours, _ = load_checkpoint(tmp_path / "run")
    x = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(back(x).logits.detach(), ours(x).logits_BSV.detach(), rtol=0, atol=1e-4)
