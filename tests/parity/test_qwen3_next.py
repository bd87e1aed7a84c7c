"""Qwen3-Next (qwen3_next) against transformers: tiny random Qwen3NextForCausalLM checkpoints with 3 Gated DeltaNet
layers and 1 gated full-attention layer (partial rotary), zero-centred norms, Qwen-MoE layers with a sigmoid-gated
shared expert; sequences longer than one chunk of the parallel form."""


import pytest
import torch

from support.hf_models import assert_same_routing, cached_tokens_equal, init_export_round_trip, make, recipe_trains_and_exports

from moecli.formats.checkpoint import load_checkpoint
from moecli.model.deltanet import chunked, recurrent

transformers = pytest.importorskip("transformers")
LONG = {"max_position_embeddings": 256}


def test_logits_and_router_choices_equal_transformers(tmp_path):
    hf = make("qwen3_next", tmp_path, vocab_size=256, **LONG)
    ours, _ = load_checkpoint(tmp_path)
    r = ours.recipe.model
    assert (r.layer_types, r.attention_gate, r.norm_zero_centered, r.rope_partial) == (
        ["linear", "linear", "linear", "full"], True, True, 0.5)
    x = torch.randint(0, 256, (2, 150), generator=torch.Generator().manual_seed(3))  # 3 chunks of 64
    assert_same_routing(hf, ours, x)


def test_cached_greedy_tokens_equal_transformers(tmp_path):
    """The cache holds the conv and recurrent states of linear layers, keys and values of full ones."""
    hf = make("qwen3_next", tmp_path, vocab_size=256, **LONG)
    cached_tokens_equal(hf, load_checkpoint(tmp_path)[0])


def test_batched_prompts_of_different_lengths_decode_as_each_alone(tmp_path):
    """moe generate --prompts prefills each prompt into its rows of the states: the same tokens as one by one."""
    from moecli.commands.generate import sample, stream_prompts

    make("qwen3_next", tmp_path, vocab_size=256, **LONG)
    ours, _ = load_checkpoint(tmp_path)
    prompts = [list(b"a short one"), list(b"a rather longer prompt than that"), list(b"mid-sized prompt")]
    alone = [sample(ours, p, 12, 0.0, 0, seed=0) for p in prompts]
    steps = list(stream_prompts(ours, prompts, 12, 0.0, 0, [0, 0, 0]))
    assert [[step[g] for step in steps] for g in range(3)] == alone


@pytest.mark.parametrize("S,L,r", [(1, 64, 1), (37, 8, 1), (130, 64, 1), (70, 16, 2)])
def test_the_chunked_and_recurrent_forms_agree(S, L, r):
    """Over several chunks, from a non-zero state; r = 2: two value heads per key head (q, k given per key head)."""
    g = torch.Generator().manual_seed(0)
    B, H, Dk, Dv = 2, 6, 8, 6
    q, k = (torch.nn.functional.normalize(torch.randn(B, H // r, S, Dk, generator=g), dim=-1) for _ in range(2))
    v = torch.randn(B, H, S, Dv, generator=g)
    decay = -torch.rand(B, H, S, generator=g) * 2
    beta = torch.rand(B, H, S, generator=g)
    s0 = torch.randn(B, H, Dk, Dv, generator=g)
    o1, s1 = recurrent(q.repeat_interleave(r, dim=1), k.repeat_interleave(r, dim=1), v, decay, beta, s0)
    o2, s2 = chunked(q, k, v, decay, beta, s0, L, r)
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)


def test_init_train_export_round_trip(tmp_path, cli):
    out, _, back, d = init_export_round_trip(tmp_path, cli, "qwen3_next", "a state in place of a cache", seq_len=96,
                                             **LONG)
    assert out["format"] == "qwen3_next" and type(back).__name__ == "Qwen3NextForCausalLM"


def test_multi_token_prediction_weights_are_read_past(tmp_path, cli):
    from safetensors.torch import load_file, save_file

    hf = make("qwen3_next", tmp_path, vocab_size=256, **LONG)
    sd = load_file(tmp_path / "model.safetensors")
    sd["mtp.fc.weight"] = torch.zeros(32, 64)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    x = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(tmp_path)[0](x).logits_BSV, hf(x).logits, rtol=0, atol=1e-5)
    r = cli("info", tmp_path, "--json")
    assert r.returncode == 0, r.stderr


def test_qwen3_next_recipe_is_the_hybrid_and_exports(tmp_path, cli):
    recipe_trains_and_exports(tmp_path, cli, "qwen3-next", "Qwen3NextForCausalLM", seq_len=128, probe=150)
