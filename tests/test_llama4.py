"""Llama 4 text (llama4_text, and the language model of a Llama4ForConditionalGeneration checkpoint) against
transformers: tiny random Llama4ForCausalLM checkpoints with chunked attention (chunks of 8) on RoPE layers with
L2 q/k norm, NoPE layers with temperature tuning (floor 4, so it grows within the test's sequence), llama3 RoPE past
its original 16 positions, dense (intermediate_size_mlp) and MoE layers interleaved, the shared expert plus a
routed expert whose sigmoid score scales its input."""

import json

import pytest
import torch

from hf_models import make

from moecli.checkpoint import load_checkpoint

transformers = pytest.importorskip("transformers")
LONG = {"max_position_embeddings": 128}
VARIANTS = {"top-1": {}, "top-2-all-moe": {"num_experts_per_tok": 2, "interleave_moe_layer_step": 1},
            "no-chunk-no-qk-norm": {"attention_chunk_size": None, "use_qk_norm": False, "attention_bias": True}}


def assert_same_routing(hf, ours, x, rel=1e-5):
    """Logits to ``rel`` of the largest; per MoE layer the same experts with the same sigmoid weights
    (feed_forward.router returns (scores over all experts, zero where not chosen; logits))."""
    theirs = {}
    for i, layer in enumerate(hf.model.layers):
        if layer.is_moe_layer:
            layer.feed_forward.router.register_forward_hook(lambda mod, a, out, i=i: theirs.__setitem__(i, out[0]))
    for _, moe in ours.moe_layers:
        moe.capture = True
    with torch.no_grad():
        ref, got = hf(x).logits, ours(x).logits_BSV
    assert (got - ref).abs().max() <= rel * ref.abs().max()
    assert sorted(theirs) == [i for i, _ in ours.moe_layers]
    for i, moe in ours.moe_layers:
        route, scores_TE = moe.last_route, theirs[i]
        weight_TK, idx_TK = scores_TE.topk(route.idx_TK.shape[1], dim=-1)
        assert torch.equal(route.idx_TK.sort(-1).values, idx_TK.sort(-1).values)
        torch.testing.assert_close(route.weight_TK.gather(1, route.idx_TK.argsort(-1)),
                                   weight_TK.gather(1, idx_TK.argsort(-1)).float(), rtol=1e-5, atol=1e-6)


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
    from moecli.generate import sample

    hf = make("llama4_text", tmp_path, vocab_size=256, **LONG)
    ours, _ = load_checkpoint(tmp_path)
    prompt = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)[0, 20:]
    assert sample(ours, prompt[0].tolist(), 40, 0.0, 0, seed=0) == theirs.tolist()
    assert sample(ours, prompt[0].tolist(), 40, 0.0, 0, seed=0, kv_cache=False) == theirs.tolist()


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
    d = tmp_path / "l4"
    make("llama4_text", d, vocab_size=256, **LONG)
    text = tmp_path / "t.txt"
    text.write_text("".join(f"{i} no position at all every other layer\n" for i in range(200)))
    r = cli("train", "--init", d, text, "-o", tmp_path / "run", "--max-steps", "2", "--batch-size", "4", "--seq-len",
            "64", "-q")
    assert r.returncode == 0, r.stderr
    r = cli("export", tmp_path / "run", "-o", tmp_path / "hf", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["format"] == "llama4_text" and out["max_abs_logit_diff"] < 1e-4
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["no_rope_layers"] == [1, 0, 1, 0] and cfg["attention_chunk_size"] == 8 and cfg["moe_layers"] == [1, 3]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(back).__name__ == "Llama4ForCausalLM"
    ours, _ = load_checkpoint(tmp_path / "run")
    x = torch.tensor(list(text.read_bytes()[:101]))[None]
    with torch.no_grad():
        theirs = back(x, labels=x).loss
        mine = torch.nn.functional.cross_entropy(ours(x).logits_BSV[0, :-1], x[0, 1:])
    assert float(theirs) == pytest.approx(float(mine), rel=1e-5)
    for cmd in (("eval", tmp_path / "hf", text), ("inspect-routing", tmp_path / "hf", text)):
        r = cli(*cmd, "--json")
        assert r.returncode == 0, (cmd, r.stderr)


def test_llama4_recipe_trains_and_exports(tmp_path, cli):
    r = cli("train", "llama4", "-o", tmp_path / "run", "--max-steps", "3", "--batch-size", "4", "--seq-len", "128",
            "-q")
    assert r.returncode == 0, r.stderr
    r = cli("export", tmp_path / "run", "-o", tmp_path / "hf", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["architecture"] == "Llama4ForCausalLM"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours, _ = load_checkpoint(tmp_path / "run")
    x = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(back(x).logits.detach(), ours(x).logits_BSV.detach(), rtol=0, atol=1e-4)
