"""GLM-4.5 (glm4_moe) against transformers: a tiny random Glm4MoeForCausalLM with q/k/v biases, q/k norm, partial
RoPE, a sigmoid router with correction bias and groups, a shared expert and a dense first layer."""

import json

import pytest
import torch

from support.hf_models import assert_same_routing, cached_tokens_equal, make, recipe_trains_and_exports

from moecli.formats.checkpoint import load_checkpoint

transformers = pytest.importorskip("transformers")


@pytest.fixture
def glm(tmp_path):
    d = tmp_path / "glm"
    return make("glm4_moe", d, vocab_size=256), d  # bytes: moecli's default tokenizer applies


def test_logits_and_router_choices_equal_transformers(glm):
    hf, d = glm
    ours, _ = load_checkpoint(d)
    r = ours.recipe
    assert (r.model.qkv_bias, r.model.qk_norm, r.model.rope_partial, r.moe.score_func, r.moe.n_groups,
            r.moe.topk_groups, r.moe.routed_scaling, r.moe.first_k_dense, r.moe.num_shared_experts) == \
        (True, True, 0.5, "sigmoid", 2, 1, 2.5, 1, 1)
    x = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    assert_same_routing(hf, ours, x)


def test_cached_greedy_tokens_equal_transformers(glm):
    hf, d = glm
    ours, _ = load_checkpoint(d)
    cached_tokens_equal(hf, ours, 8, 30)


def test_init_train_export_round_trip_and_routing(glm, tmp_path, cli):
    """train --init 2 steps (router biases updated), export as glm4_moe: transformers loads the same class with
    moecli's loss; inspect-routing reads the checkpoint."""
    _, d = glm
    text = tmp_path / "t.txt"
    text.write_text("".join(f"{i} glm routes by sigmoid with a correction bias\n" for i in range(200)))
    r = cli("train", "--init", d, text, "-o", tmp_path / "run", "--max-steps", "2", "--batch-size", "4", "--seq-len",
            "32", "--set", "balance.bias_update_rate=0.01", "-q", "--json")
    assert r.returncode == 0, r.stderr
    r = cli("export", tmp_path / "run", "-o", tmp_path / "hf", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["format"] == "glm4_moe" and res["max_abs_logit_diff"] < 1e-4 * res["max_abs_logit"]
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["Glm4MoeForCausalLM"] and cfg["rope_parameters"]["partial_rotary_factor"] == 0.5
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(back).__name__ == "Glm4MoeForCausalLM"
    assert back.model.layers[1].mlp.gate.e_score_correction_bias.abs().max() > 0
    ours, _ = load_checkpoint(tmp_path / "run")
    x = torch.tensor(list(text.read_bytes()[:65]))[None]
    with torch.no_grad():
        theirs = back(x[:, :-1], labels=x[:, :-1]).loss
        mine = torch.nn.functional.cross_entropy(ours(x[:, :-1]).logits_BSV[0, :-1], x[0, 1:-1])
    assert float(theirs) == pytest.approx(float(mine), rel=1e-5)
    r = cli("inspect-routing", tmp_path / "hf", text, "--json")
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)["layers"]) == {"1", "2"}


def test_glm_recipe_exports_to_glm4_moe(tmp_path, cli):
    """The bundled glm-4.5 recipe (partial RoPE, q/k norm, sigmoid router with aux-free bias) is a glm4_moe."""
    recipe_trains_and_exports(tmp_path, cli, "glm-4.5", "Glm4MoeForCausalLM", seq_len=128, probe=40)


def test_what_glm4_moe_cannot_express_is_refused(tmp_path, cli):
    r = cli("train", "mixtral", "-o", tmp_path / "run", "--max-steps", "1", "--batch-size", "4", "-q")
    assert r.returncode == 0, r.stderr
    r = cli("export", tmp_path / "run", "-o", tmp_path / "hf", "--format", "glm4_moe")
    assert r.returncode == 2 and "glm4_moe cannot express softmax scores" in r.stderr
