"""Llama 4 text (llama4_text, and the language model of a Llama4ForConditionalGeneration checkpoint) against
transformers: tiny random Llama4ForCausalLM checkpoints with chunked attention (chunks of 8) on RoPE layers with
L2 q/k norm, NoPE layers with temperature tuning (floor 4, so it grows within the test's sequence), llama3 RoPE past
its original 16 positions, dense (intermediate_size_mlp) and MoE layers interleaved, the shared expert plus a
routed expert whose sigmoid score scales its input."""

import json

import pytest
import torch

from support.hf_models import cached_tokens_equal, init_export_round_trip, make, recipe_trains_and_exports, routes_equal

from moecli.formats.checkpoint import load_checkpoint

transformers = pytest.importorskip("transformers")
LONG = {"max_position_embeddings": 128}
VARIANTS = {"top-1": {}, "top-2-all-moe": {"num_experts_per_tok": 2, "interleave_moe_layer_step": 1},
            "no-chunk-no-qk-norm": {"attention_chunk_size": None, "use_qk_norm": False, "attention_bias": True}}


def assert_same_routing(hf, ours, x):
    """feed_forward.router returns (scores over all experts, zero where not chosen; logits)."""
    routers = [(i, layer.feed_forward.router) for i, layer in enumerate(hf.model.layers) if layer.is_moe_layer]
    routes_equal(hf, ours, x, routers, lambda out, k: out[0].topk(k, dim=-1))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_and_router_choices_equal_transformers(tmp_path, variant):
    hf = make("llama4_text", tmp_path, vocab_size=256, **LONG, **VARIANTS[variant])
    ours, _ = load_checkpoint(tmp_path)
    r = ours.recipe
    assert r.model.rope_interleave and r.moe.weight_input and r.moe.num_shared_experts == 1
    if variant == "top-1":
        assert (r.model.layer_types, r.model.attention_chunk, r.model.temperature_floor, r.moe.moe_every_n) == (
            ["chunked", "nope"], 8, 4, 2)
    x = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(3))  # many chunks, past 16
    assert_same_routing(hf, ours, x)


def test_cached_greedy_tokens_equal_transformers(tmp_path):
    """The cache keeps chunked layers to the query's chunk and NoPE layers' temperature at each token's position."""
    hf = make("llama4_text", tmp_path, vocab_size=256, **LONG)
    cached_tokens_equal(hf, load_checkpoint(tmp_path)[0])


@pytest.mark.parametrize("layout", ["hub", "transformers-5"])
def test_the_language_model_of_a_multimodal_checkpoint_is_read(tmp_path, cli, layout):
    """Llama4ForConditionalGeneration: config text_config, tensors language_model.model.* as the hub's files hold
    them (or model.language_model.* as transformers 5 saves them); the vision tower is read past."""
    from safetensors.torch import load_file, save_file

    hf = make("llama4_text", tmp_path / "text", vocab_size=256, **LONG)
    text_cfg = json.loads((tmp_path / "text" / "config.json").read_text())
    d = tmp_path / "mm"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama4", "architectures": [
        "Llama4ForConditionalGeneration"], "text_config": text_cfg, "vision_config": {"hidden_size": 8}}))
    pre, head = ("language_model.model.", "language_model.lm_head.") if layout == "hub" else (
        "model.language_model.", "lm_head.")
    sd = {(pre + k[len("model."):] if k.startswith("model.") else head + k[len("lm_head."):]): v
          for k, v in load_file(tmp_path / "text" / "model.safetensors").items()}
    sd["vision_model.patch_embedding.linear.weight"] = torch.zeros(8, 8)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    ours, _ = load_checkpoint(d)
    x = torch.randint(0, 256, (1, 50), generator=torch.Generator().manual_seed(1))
    assert_same_routing(hf, ours, x)
    r = cli("info", d, "--json")
    assert r.returncode == 0, r.stderr


def test_init_train_export_round_trip(tmp_path, cli):
    """train --init 2 steps, export as llama4_text: transformers loads Llama4ForCausalLM with moecli's loss."""
    out, cfg, back, _ = init_export_round_trip(tmp_path, cli, "llama4_text", "no position at all every other layer",
                                               **LONG)
    assert out["format"] == "llama4_text" and type(back).__name__ == "Llama4ForCausalLM"
    assert cfg["no_rope_layers"] == [1, 0, 1, 0] and cfg["attention_chunk_size"] == 8 and cfg["moe_layers"] == [1, 3]


def test_llama4_recipe_trains_and_exports(tmp_path, cli):
    recipe_trains_and_exports(tmp_path, cli, "llama4", "Llama4ForCausalLM", seq_len=128, probe=200)
