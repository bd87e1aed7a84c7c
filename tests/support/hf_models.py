"""Tiny random Hugging Face models made locally with transformers (a test-only dependency)."""

import torch

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def make(kind: str, directory, seed: int = 0, **extra):
    transformers = __import__("pytest").importorskip("transformers")
    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {}),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 16}),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                    {"num_local_experts": 4, "num_experts_per_tok": 2}),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                      {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "norm_topk_prob": True,
                       "head_dim": 16}),
        "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM,
                  {"num_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 16, "eos_token_id": None,
                   "pad_token_id": None, "bos_token_id": None}),
        "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                      {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                       "shared_expert_intermediate_size": 24}),
        "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM,
                        {"num_hidden_layers": 3, "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                         "qk_rope_head_dim": 8, "v_head_dim": 12, "moe_intermediate_size": 16, "n_routed_experts": 8,
                         "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 2, "topk_group": 1,
                         "first_k_dense_replace": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
                         "num_key_value_heads": 4, "num_nextn_predict_layers": 0, "eos_token_id": None,
                         "pad_token_id": None, "bos_token_id": None}),
        "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM,
                        {"num_hidden_layers": 3, "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                         "qk_rope_head_dim": 8, "v_head_dim": 12, "moe_intermediate_size": 16, "n_routed_experts": 8,
                         "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 4, "topk_group": 2,
                         "topk_method": "group_limited_greedy", "first_k_dense_replace": 1,
                         "routed_scaling_factor": 1.5, "num_key_value_heads": 4, "head_dim": 8,
                         "eos_token_id": None, "pad_token_id": None, "bos_token_id": None}),
        "glm4_moe": (transformers.Glm4MoeConfig, transformers.Glm4MoeForCausalLM,
                     {"num_hidden_layers": 3, "head_dim": 16, "moe_intermediate_size": 16, "n_routed_experts": 8,
                      "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 2, "topk_group": 1,
                      "first_k_dense_replace": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
                      "use_qk_norm": True, "attention_bias": True, "partial_rotary_factor": 0.5,
                      "num_nextn_predict_layers": 0, "eos_token_id": None, "pad_token_id": None,
                      "bos_token_id": None}),
        "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM,
                    {"num_hidden_layers": 4, "head_dim": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
                     "intermediate_size": 16, "sliding_window": 6, "swiglu_limit": 1.0,
                     "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                         "original_max_position_embeddings": 16, "beta_fast": 32.0,
                                         "beta_slow": 1.0, "truncate": False},
                     "eos_token_id": None, "pad_token_id": None, "bos_token_id": None}),
        "llama4_text": (transformers.Llama4TextConfig, transformers.Llama4ForCausalLM,
                        {"num_hidden_layers": 4, "head_dim": 8, "num_local_experts": 4, "num_experts_per_tok": 1,
                         "intermediate_size": 16, "intermediate_size_mlp": 40, "interleave_moe_layer_step": 2,
                         "no_rope_layer_interval": 2, "attention_chunk_size": 8, "floor_scale": 4,
                         "attn_scale": 0.5, "rope_parameters": {
                             "rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                         "eos_token_id": None, "pad_token_id": None, "bos_token_id": None}),
        "qwen3_next": (transformers.Qwen3NextConfig, transformers.Qwen3NextForCausalLM,
                       {"num_hidden_layers": 4, "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2,
                        "moe_intermediate_size": 16, "shared_expert_intermediate_size": 24, "norm_topk_prob": True,
                        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
                        "linear_value_head_dim": 8, "linear_conv_kernel_dim": 4, "partial_rotary_factor": 0.5,
                        "eos_token_id": None, "pad_token_id": None, "bos_token_id": None}),
    }
    C, M, kw = classes[kind]
    torch.manual_seed(seed)
    model = M(C(**{**COMMON, **kw, **extra})).eval()
    with torch.no_grad():  # larger-than-default weights so that differences would show
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        if kind == "qwen3_next":  # zero-centred norms scale by 1 + w: w around 0 keeps the same range of scales
            for name, p in model.named_parameters():
                if name.endswith("norm.weight") and "linear_attn" not in name:
                    p.uniform_(-0.5, 0.5)
        for name, b in model.named_buffers():  # routers' correction biases (DeepSeek-V3 style): non-zero
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.05, 0.05)
    save_kw = {"max_shard_size": extra.pop("_shard", None)} if "_shard" in extra else {}
    model.save_pretrained(directory, **save_kw)
    return model


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def assert_same_routing(hf, ours, x, rel: float = 1e-5):
    """routes_equal for transformers models whose MoE blocks route through ``mlp.gate`` returning (logits, weights,
    indices) (DeepSeek-V2/V3, GLM, Qwen3-Next)."""
    routers = [(i, layer.mlp.gate) for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "gate")]
    routes_equal(hf, ours, x, routers, lambda out, k: (out[1], out[2]), rel)


def routes_equal(hf, ours, x, routers, unpack, rel: float = 1e-5):
    """Logits to ``rel`` of the largest, and per MoE layer the same experts with the same weights: ``routers``
    gives (layer index, the transformers module to hook) pairs, ``unpack`` turns its output into (weight_TK,
    idx_TK)."""
    theirs = {}
    for i, module in routers:
        module.register_forward_hook(lambda mod, a, out, i=i: theirs.__setitem__(i, out))
    for _, moe in ours.moe_layers:
        moe.capture = True
    with torch.no_grad():
        ref, got = hf(x).logits, ours(x).logits_BSV
    assert (got - ref).abs().max() <= rel * ref.abs().max()
    assert sorted(theirs) == [i for i, _ in ours.moe_layers]
    for i, moe in ours.moe_layers:
        route = moe.last_route
        weight_TK, idx_TK = unpack(theirs[i], route.idx_TK.shape[1])
        assert torch.equal(route.idx_TK.sort(-1).values, idx_TK.sort(-1).values)
        torch.testing.assert_close(route.weight_TK.gather(1, route.idx_TK.argsort(-1)),
                                   weight_TK.gather(1, idx_TK.argsort(-1)).float(), rtol=1e-5, atol=1e-6)


def init_export_round_trip(tmp_path, cli, kind: str, line: str, seq_len: int = 64, train=(), **make_kw):
    """A tiny transformers ``kind`` checkpoint, ``train --init`` 2 steps on lines of ``line``, ``export``: the
    export loads in transformers with moecli's loss (rel 1e-5) and eval / inspect-routing read it. Returns
    (export's --json, the export's config.json, the transformers model, the checkpoint made) for more checks."""
    import json

    import pytest

    transformers = pytest.importorskip("transformers")
    from moecli.formats.checkpoint import load_checkpoint

    d = tmp_path / kind
    make(kind, d, vocab_size=256, **make_kw)
    text = tmp_path / "t.txt"
    text.write_text("".join(f"{i} {line}\n" for i in range(200)))
    r = cli("train", "--init", d, text, "-o", tmp_path / "run", "--max-steps", "2", "--batch-size", "4", "--seq-len",
            str(seq_len), *train, "-q")
    assert r.returncode == 0, r.stderr
    r = cli("export", tmp_path / "run", "-o", tmp_path / "hf", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["max_abs_logit_diff"] < 1e-4
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours, _ = load_checkpoint(tmp_path / "run")
    x = torch.tensor(list(text.read_bytes()[:101]))[None]
    with torch.no_grad():
        theirs = back(x, labels=x).loss
        mine = torch.nn.functional.cross_entropy(ours(x).logits_BSV[0, :-1], x[0, 1:])
    assert float(theirs) == pytest.approx(float(mine), rel=1e-5)
    for cmd in (("eval", tmp_path / "hf", text), ("inspect-routing", tmp_path / "hf", text)):
        r = cli(*cmd, "--json")
        assert r.returncode == 0, (cmd, r.stderr)
    return out, json.loads((tmp_path / "hf" / "config.json").read_text()), back, d


def recipe_trains_and_exports(tmp_path, cli, recipe: str, architecture: str, seq_len: int, probe: int):
    """The bundled recipe trains 3 steps and exports as ``architecture``, whose logits transformers gives back on
    ``probe`` tokens (atol 1e-4)."""
    import json

    import pytest

    transformers = pytest.importorskip("transformers")
    from moecli.formats.checkpoint import load_checkpoint

    r = cli("train", recipe, "-o", tmp_path / "run", "--max-steps", "3", "--batch-size", "4", "--seq-len",
            str(seq_len), "-q")
    assert r.returncode == 0, r.stderr
    r = cli("export", tmp_path / "run", "-o", tmp_path / "hf", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["architecture"] == architecture
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours, _ = load_checkpoint(tmp_path / "run")
    x = torch.randint(0, 256, (1, probe), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ours(x).logits_BSV, rtol=0, atol=1e-4)


def cached_tokens_equal(hf, ours, prompt_len: int = 20, new: int = 40, vocab: int = 256):
    """Greedy tokens from moecli's KV cache (and without it) equal transformers' generate's."""
    from moecli.commands.generate import sample

    prompt = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)[0, prompt_len:]
    assert sample(ours, prompt[0].tolist(), new, 0.0, 0, seed=0) == theirs.tolist()
    assert sample(ours, prompt[0].tolist(), new, 0.0, 0, seed=0, kv_cache=False) == theirs.tolist()
