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
    """Logits to ``rel`` of the largest, and per MoE layer the same experts with the same weights, of a transformers
    model whose MoE blocks route through ``mlp.gate`` returning (logits, weights, indices) (DeepSeek-V2/V3, GLM)."""
    theirs = {}
    for i, layer in enumerate(hf.model.layers):
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(lambda mod, a, out, i=i: theirs.__setitem__(i, out))
    for _, moe in ours.moe_layers:
        moe.capture = True
    ref = logits(hf, x)
    with torch.no_grad():
        got = ours(x).logits_BSV
    assert (got - ref).abs().max() <= rel * ref.abs().max()
    assert sorted(theirs) == [i for i, _ in ours.moe_layers]
    for i, moe in ours.moe_layers:
        _, weight_TK, idx_TK = theirs[i]
        assert torch.equal(moe.last_route.idx_TK.sort(-1).values, idx_TK.sort(-1).values)
        mine = moe.last_route.weight_TK.gather(1, moe.last_route.idx_TK.argsort(-1))
        torch.testing.assert_close(mine, weight_TK.gather(1, idx_TK.argsort(-1)).float(), rtol=1e-5, atol=1e-6)
