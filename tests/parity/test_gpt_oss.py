"""GPT-OSS (gpt_oss) against transformers: tiny random GptOssForCausalLM checkpoints with non-zero attention sinks
and biases, alternating sliding-window (6 tokens) and full layers, YaRN past its original 16 positions, experts
with biases and the clamped SwiGLU (a limit of 1, so the clamps bite), the biased router."""


import pytest
import torch

from support.hf_models import cached_tokens_equal, init_export_round_trip, make, recipe_trains_and_exports, routes_equal

from moecli.formats.checkpoint import load_checkpoint

transformers = pytest.importorskip("transformers")
LONG = {"max_position_embeddings": 128}


def assert_same_routing(hf, ours, x):
    """mlp.router returns (logits, top-k softmax weights, indices)."""
    routes_equal(hf, ours, x, [(i, layer.mlp.router) for i, layer in enumerate(hf.model.layers)],
                 lambda out, k: (out[1], out[2]))


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
    hf = make("gpt_oss", tmp_path, vocab_size=256, **LONG)
    cached_tokens_equal(hf, load_checkpoint(tmp_path)[0])


def test_init_train_export_round_trip(tmp_path, cli):
    """train --init 2 steps, export as gpt_oss: transformers loads GptOssForCausalLM with moecli's loss (sinks and
    every bias trained); eval, inspect-routing and info read both."""
    out, cfg, back, d = init_export_round_trip(tmp_path, cli, "gpt_oss", "sinks take the attention nobody needs",
                                               train=("--set", "train.lr=1e-2"), **LONG)
    assert out["format"] == "gpt_oss" and type(back).__name__ == "GptOssForCausalLM"
    assert cfg["layer_types"][:2] == ["sliding_attention", "full_attention"] and cfg["sliding_window"] == 6
    before = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    assert not torch.equal(back.model.layers[0].self_attn.sinks, before.model.layers[0].self_attn.sinks)
    assert not torch.equal(back.model.layers[0].mlp.experts.gate_up_proj_bias,
                           before.model.layers[0].mlp.experts.gate_up_proj_bias)
    for target in (tmp_path / "hf", d):
        r = cli("info", target, "--json")
        assert r.returncode == 0, r.stderr


def test_gpt_oss_recipe_trains_and_exports(tmp_path, cli):
    recipe_trains_and_exports(tmp_path, cli, "gpt-oss", "GptOssForCausalLM", seq_len=64, probe=100)
