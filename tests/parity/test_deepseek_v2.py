"""DeepSeek-V2 (deepseek_v2) against transformers: MLA with RoPE on complex pairs, the softmax router with
group_limited_greedy or greedy top-k and routed scaling, a shared expert, a dense first layer."""


import pytest
import torch

from support.hf_models import assert_same_routing, cached_tokens_equal, init_export_round_trip, make

from moecli.formats.checkpoint import load_checkpoint

transformers = pytest.importorskip("transformers")

VARIANTS = {"group-limited": {}, "greedy-no-q-lora": {"q_lora_rank": None, "topk_method": "greedy"},
            "yarn": {"max_position_embeddings": 128, "rope_parameters": {
                "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
                "mscale": 0.707, "mscale_all_dim": 0.707}}}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_and_router_choices_equal_transformers(tmp_path, variant):
    hf = make("deepseek_v2", tmp_path, vocab_size=256, **VARIANTS[variant])
    ours, _ = load_checkpoint(tmp_path)
    m = ours.recipe.moe
    assert (m.score_func, m.renormalize, m.routed_scaling) == ("softmax", False, 1.5)
    assert (m.n_groups, m.topk_groups) == ((1, 1) if "greedy-no" in variant else (4, 2))
    x = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(3))
    assert_same_routing(hf, ours, x)


def test_cached_greedy_tokens_equal_transformers(tmp_path):
    hf = make("deepseek_v2", tmp_path, vocab_size=256, **VARIANTS["yarn"])
    ours, _ = load_checkpoint(tmp_path)
    cached_tokens_equal(hf, ours, 20, 40)


def test_init_train_export_round_trip(tmp_path, cli):
    out, cfg, back, _ = init_export_round_trip(tmp_path, cli, "deepseek_v2", "softmax routing over limited groups")
    assert out["format"] == "deepseek_v2" and type(back).__name__ == "DeepseekV2ForCausalLM"
    assert (cfg["topk_method"], cfg["n_group"], cfg["topk_group"]) == ("group_limited_greedy", 4, 2)