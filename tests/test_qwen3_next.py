"""Qwen3-Next (qwen3_next) against transformers: tiny random Qwen3NextForCausalLM checkpoints with 3 Gated DeltaNet
layers and 1 gated full-attention layer (partial rotary), zero-centred norms, Qwen-MoE layers with a sigmoid-gated
shared expert; sequences longer than one chunk of the parallel form."""

import json

import pytest
import torch

from hf_models import assert_same_routing, make

from moecli.checkpoint import load_checkpoint
from moecli.deltanet import chunked, recurrent

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
    from moecli.generate import sample

    hf = make("qwen3_next", tmp_path, vocab_size=256, **LONG)
    ours, _ = load_checkpoint(tmp_path)
    prompt = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)[0, 20:]
    assert sample(ours, prompt[0].tolist(), 40, 0.0, 0, seed=0) == theirs.tolist()
    assert sample(ours, prompt[0].tolist(), 40, 0.0, 0, seed=0, kv_cache=False) == theirs.tolist()


def test_batched_prompts_of_different_lengths_decode_as_each_alone(tmp_path):
    """moe generate --prompts prefills each prompt into its rows of the states: the same tokens as one by one."""
    from moecli.generate import sample, stream_prompts

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


def test_init_train_export_round_trip_reading_past_mtp_weights(tmp_path, cli):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "qn"
    make("qwen3_next", d, vocab_size=256, **LONG)
    sd = load_file(d / "model.safetensors")
    sd["mtp.fc.weight"] = torch.zeros(32, 64)  # a multi-token-prediction weight: read past
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    text = tmp_path / "t.txt"
    text.write_text("".join(f"{i} a state in place of a cache\n" for i in range(200)))
    r = cli("train", "--init", d, text, "-o", tmp_path / "run", "--max-steps", "2", "--batch-size", "4", "--seq-len",
            "96", "-q")
    assert r.returncode == 0, r.stderr
    r = cli("export", tmp_path / "run", "-o", tmp_path / "hf", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["format"] == "qwen3_next" and out["max_abs_logit_diff"] < 1e-4
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(back).__name__ == "Qwen3NextForCausalLM"
    ours, _ = load_checkpoint(tmp_path / "run")
    x = torch.tensor(list(text.read_bytes()[:101]))[None]
    with torch.no_grad():
        theirs = back(x, labels=x).loss
        mine = torch.nn.functional.cross_entropy(ours(x).logits_BSV[0, :-1], x[0, 1:])
    assert float(theirs) == pytest.approx(float(mine), rel=1e-5)
    for cmd in (("eval", tmp_path / "hf", text), ("inspect-routing", tmp_path / "hf", text), ("info", d)):
        r = cli(*cmd, "--json")
        assert r.returncode == 0, (cmd, r.stderr)


def test_qwen3_next_recipe_is_the_hybrid_and_exports(tmp_path, cli):
    r = cli("train", "qwen3-next", "-o", tmp_path / "run", "--max-steps", "3", "--batch-size", "4", "--seq-len", "128",
            "-q")
    assert r.returncode == 0, r.stderr
    r = cli("export", tmp_path / "run", "-o", tmp_path / "hf", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["architecture"] == "Qwen3NextForCausalLM"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours, _ = load_checkpoint(tmp_path / "run")
    x = torch.randint(0, 256, (1, 150), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(back(x).logits.detach(), ours(x).logits_BSV.detach(), rtol=0, atol=1e-4)
