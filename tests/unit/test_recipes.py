import pytest
import torch

from moecli.config import list_recipes, load_recipe
from moecli.model.transformer import build_model
from moecli.model.params import parameter_report

SEED_SYSTEMS = {"switch", "gshard", "glam", "mixtral", "deepseek-moe", "deepseek-v3", "qwen3-moe", "gpt-oss",
                "llama4", "kimi-k2", "glm-4.5", "qwen3-next", "dense"}


def test_every_seed_system_has_a_recipe():
    assert SEED_SYSTEMS <= set(list_recipes())


@pytest.mark.parametrize("name", sorted(SEED_SYSTEMS))
def test_recipe_builds_forward_backward(name):
    recipe = load_recipe(name)
    torch.manual_seed(0)
    model = build_model(recipe)
    model.train()
    tokens = torch.randint(0, recipe.model.vocab_size, (2, 24))
    out = model(tokens)
    assert out.logits_BSV.shape == (2, 24, recipe.model.vocab_size)
    loss = torch.nn.functional.cross_entropy(out.logits_BSV[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    (loss + out.balance_loss).backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # every MoE layer's router received gradient (unless top-1 sigmoid with no aux, it always does here)
    for _, moe in model.moe_layers:
        assert moe.router.gate.weight.grad.abs().sum() > 0
    rep = parameter_report(model)
    assert rep["total"] == sum(p.numel() for p in model.parameters())
    if recipe.moe.num_experts:
        assert rep["active"] < rep["total"]
        assert model.moe_layers, "an MoE recipe must produce MoE layers"
    else:
        assert rep["active"] == rep["total"]


def test_active_params_hand_count():
    r = load_recipe("mixtral")
    rep = parameter_report(build_model(r))
    D, F, E, K = r.model.d_model, r.moe.expert_ffn, r.moe.num_experts, r.moe.top_k
    inactive_per_layer = 3 * D * F * (E - K)
    assert rep["total"] - rep["active"] == inactive_per_layer * len(r.moe_layer_indices())


def test_layer_placement():
    glam = load_recipe("glam")
    assert glam.moe_layer_indices() == [1, 3]
    v3 = load_recipe("deepseek-v3")
    assert v3.moe_layer_indices() == [1, 2, 3]
    glm = load_recipe("glm-4.5")
    assert glm.moe_layer_indices() == [2, 3]
    assert load_recipe("dense").moe_layer_indices() == []


def test_same_seed_same_weights():
    r = load_recipe("mixtral")
    a, b = build_model(r, seed=3), build_model(r, seed=3)
    c = build_model(r, seed=4)
    for (n, p), (_, q), (_, s) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(a.tok_embeddings.weight, c.tok_embeddings.weight)


def test_attention_under_bf16_autocast_runs_in_fp32_only_below_the_threshold():
    """train.precision bf16-mixed: attention with S * Dh < 2^15 is computed in fp32 (faster on the CPU
    there, and exactly the fp32 result), longer or wider in bf16 (within bf16 rounding of fp32)."""
    import torch.nn.functional as F

    from moecli.model.attention import FP32_ATTENTION_BELOW, attend

    torch.manual_seed(0)
    for S, Dh in ((64, 32), (256, 128)):
        q, k, v = (torch.randn(2, 4, S, Dh) for _ in range(3))
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), gqa=False)
        exact = F.scaled_dot_product_attention(*(t.bfloat16().float() for t in (q, k, v)), is_causal=True)
        if S * Dh < FP32_ATTENTION_BELOW:
            assert o.dtype == torch.float32 and torch.equal(o, exact)
        else:
            assert o.dtype == torch.bfloat16
            torch.testing.assert_close(o.float(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("name", sorted(SEED_SYSTEMS))
def test_recipe_report_equals_the_models(name):
    """The report counted from one block of each kind equals the whole model's, per layer and in all."""
    from moecli.model.transformer import meta_model
    from moecli.model.params import param_counts
    from moecli.model.params import recipe_parameter_report

    for ov in ({}, {"model.tie_embeddings": True}):
        from moecli.config import apply_overrides

        r = apply_overrides(load_recipe(name), ov)
        model = meta_model(r)
        assert recipe_parameter_report(r) == parameter_report(model)
        experts = sum(p.numel() for _, moe in model.moe_layers for p in moe.experts.parameters())
        assert param_counts(r) == (sum(p.numel() for p in model.parameters()), experts)
