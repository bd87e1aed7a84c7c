"""DeepSeek-V3 / Kimi K2 (deepseek_v3) against transformers: tiny random DeepseekV3ForCausalLM checkpoints with
multi-head latent attention (q LoRA or not, interleaved RoPE or not, attention biases, YaRN past the original
context with mscale), the sigmoid router with correction bias and groups, a shared expert, a dense first layer."""

import json

import pytest
import torch

from support.hf_models import assert_same_routing, cached_tokens_equal, init_export_round_trip, logits, make

from moecli.formats.checkpoint import load_checkpoint

transformers = pytest.importorskip("transformers")

YARN = {"max_position_embeddings": 128, "rope_parameters": {
    "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
    "mscale": 1.0, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}}
VARIANTS = {"q-lora": {}, "no-q-lora": {"q_lora_rank": None}, "halves-bias": {"rope_interleave": False,
                                                                              "attention_bias": True},
            "yarn": YARN}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_and_router_choices_equal_transformers(tmp_path, variant):
    hf = make("deepseek_v3", tmp_path, vocab_size=256, **VARIANTS[variant])
    ours, _ = load_checkpoint(tmp_path)
    r = ours.recipe
    assert (r.model.attention, r.moe.score_func, r.moe.n_groups, r.moe.first_k_dense) == ("mla", "sigmoid", 2, 1)
    x = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(3))  # past YaRN's original 32
    assert_same_routing(hf, ours, x)


@pytest.mark.parametrize("variant", ["q-lora", "yarn"])
def test_cached_greedy_tokens_equal_transformers(tmp_path, variant):
    """moecli's MLA cache (expanded keys and values) gives the tokens of transformers' latent cache."""
    hf = make("deepseek_v3", tmp_path, vocab_size=256, **VARIANTS[variant])
    ours, _ = load_checkpoint(tmp_path)
    cached_tokens_equal(hf, ours, 20, 40)


def test_init_train_export_round_trip_and_routing(tmp_path, cli):
    """train --init 2 steps (router biases updated), export as deepseek_v3: transformers loads the same class
    with moecli's loss; inspect-routing reads the export."""
    out, cfg, back, _ = init_export_round_trip(tmp_path, cli, "deepseek_v3", "latent attention compresses keys and "
                                               "values", train=("--set", "balance.bias_update_rate=0.01"), **YARN)
    assert out["format"] == "deepseek_v3" and type(back).__name__ == "DeepseekV3ForCausalLM"
    assert cfg["rope_parameters"]["rope_type"] == "yarn" and cfg["q_lora_rank"] == 24
    assert back.model.layers[1].mlp.gate.e_score_correction_bias.abs().max() > 0


def test_kimi_k2_config_reads_as_deepseek_v3(tmp_path, cli):
    """Kimi K2 ships DeepSeek-V3's layout under model_type kimi_k2: read (multi-token-prediction layers past)."""
    hf = make("deepseek_v3", tmp_path, vocab_size=256)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "kimi_k2", "num_nextn_predict_layers": 1}))
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "model.safetensors")
    sd["model.layers.3.eh_proj.weight"] = torch.zeros(32, 64)  # an MTP layer's tensor: read past
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours, _ = load_checkpoint(tmp_path)
    x = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(x).logits_BSV.detach(), logits(hf, x), rtol=0, atol=1e-5)
    r = cli("info", tmp_path, "--json")
    assert r.returncode == 0, r.stderr


def test_deepseek_recipes_are_mla_and_export(tmp_path, cli):
    for name in ("deepseek-v3", "kimi-k2"):
        r = cli("train", name, "-o", tmp_path / name, "--max-steps", "2", "--batch-size", "4", "--seq-len", "64", "-q")
        assert r.returncode == 0, r.stderr
        r = cli("export", tmp_path / name, "-o", tmp_path / f"{name}-hf", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["architecture"] == "DeepseekV3ForCausalLM"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "kimi-k2-hf").eval()
    ours, _ = load_checkpoint(tmp_path / "kimi-k2")
    x = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(back(x).logits.detach(), ours(x).logits_BSV.detach(), rtol=0, atol=1e-4)
