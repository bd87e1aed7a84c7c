"""moe export: moecli checkpoints as Hugging Face directories that transformers loads with the same logits."""

import json

import pytest
import torch

from moecli.formats.native import save_checkpoint
from moecli.config import recipe_from_dict
from moecli.model.transformer import build_model

MODEL = {"n_layers": 2, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64, "context": 64}
MOE = {"num_experts": 4, "top_k": 2, "expert_ffn": 24}


def checkpoint(directory, model=None, moe=None, bias=False):
    """A checkpoint with larger-than-init random weights (so that any mismatch shows in the logits)."""
    recipe = recipe_from_dict({"name": "t", "model": {**MODEL, **(model or {})}, "moe": moe or {},
                               "train": {"seq_len": 32}})
    m = build_model(recipe, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1, generator=g) if p.dim() > 1 else p.uniform_(0.5, 1.5, generator=g)
        if bias:
            for _, layer in m.moe_layers:
                layer.router.expert_bias.normal_(generator=g)
    directory.mkdir()
    save_checkpoint(m, directory)
    return m


@pytest.mark.parametrize("model,moe,fmt,arch", [
    ({}, MOE, "mixtral", "MixtralForCausalLM"),
    ({"qk_norm": True}, MOE, "qwen3_moe", "Qwen3MoeForCausalLM"),
    ({"qk_norm": True}, {**MOE, "first_k_dense": 1, "renormalize": False}, "qwen3_moe", "Qwen3MoeForCausalLM"),
    ({"qkv_bias": True}, {**MOE, "num_shared_experts": 1, "shared_gate": True}, "qwen2_moe", "Qwen2MoeForCausalLM"),
    ({"qkv_bias": True}, MOE, "qwen2_moe", "Qwen2MoeForCausalLM"),
    ({}, {}, "llama", "LlamaForCausalLM"),
    ({"qk_norm": True}, {}, "qwen3", "Qwen3ForCausalLM"),
    ({"qkv_bias": True, "tie_embeddings": True}, {}, "qwen2", "Qwen2ForCausalLM"),
])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, cli, model, moe, fmt, arch):
    transformers = pytest.importorskip("transformers")
    ours = checkpoint(tmp_path / "ckpt", model, moe).eval()
    r = cli("export", tmp_path / "ckpt", "-o", tmp_path / "hf", "--json")  # --format auto picks the family
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["format"] == fmt and res["architecture"] == arch
    assert res["max_abs_logit_diff"] < 1e-5
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == arch
    x = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(x).logits_BSV, hf(x).logits
    assert float((a - b).abs().max()) < 1e-4 * float(a.abs().max())


def test_export_bf16_and_refusals(tmp_path, cli):
    from safetensors.torch import load_file

    m = checkpoint(tmp_path / "moe", moe=MOE)
    r = cli("export", tmp_path / "moe", "-o", tmp_path / "bf16", "--dtype", "bfloat16", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert json.loads(r.stdout)["max_abs_logit_diff"] > 0  # reported; routing flips make its size data-dependent
    st = load_file(tmp_path / "bf16" / "model.safetensors")
    ex = m.layers[1].moe.experts
    assert torch.equal(st["model.layers.1.block_sparse_moe.experts.3.w2.weight"], ex.w2_EFD[3].t().bfloat16())
    assert torch.equal(st["model.embed_tokens.weight"], m.tok_embeddings.weight.bfloat16())
    checkpoint(tmp_path / "sig", moe={**MOE, "score_func": "sigmoid"})
    checkpoint(tmp_path / "biased", moe=MOE, bias=True)
    cases = [
        # the way out it names is one export has (it writes no moecli format: the checkpoint already is one)
        (["export", tmp_path / "sig", "-o", tmp_path / "o1", "--format", "mixtral"], "cannot express sigmoid scores; no Hugging Face "
         "format moecli writes holds this model (keep the moecli checkpoint"),
        (["export", tmp_path / "biased", "-o", tmp_path / "o2"], "aux-loss-free expert biases"),
        (["export", tmp_path / "moe", "-o", tmp_path / "o3", "--format", "llama"], "this model has MoE layers"),
        (["export", tmp_path / "moe", "-o", tmp_path / "o4", "--format", "gpt2"], "--format: one of"),
        (["export", tmp_path / "moe", "-o", tmp_path / "bf16"], "exists and is not empty"),
        (["export", tmp_path / "moe", "-o", tmp_path / "moe", "--force"], "is the checkpoint being exported"),
    ]
    for args, message in cases:
        r = cli(*args)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
    r = cli("export", tmp_path / "sig", "-o", tmp_path / "glm", "--json")  # auto: sigmoid routing is GLM-4.5's
    assert r.returncode == 0 and json.loads(r.stdout)["format"] == "glm4_moe", r.stderr
    assert (tmp_path / "moe" / "model.safetensors").is_file()  # the source is untouched


def test_export_in_shards_loads_in_transformers(tmp_path, cli):
    """--shard-size-mb: several files plus an index (Hugging Face's names); transformers loads them with
    the moecli model's logits, and every tensor is in exactly one shard."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    m = checkpoint(tmp_path / "moe", moe=MOE)
    r = cli("export", tmp_path / "moe", "-o", tmp_path / "out", "--shard-size-mb", "0.05", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    files = sorted(p.name for p in (tmp_path / "out").glob("model-*.safetensors"))
    assert res["shards"] == len(files) > 2 and not (tmp_path / "out" / "model.safetensors").exists()
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    seen = {}
    for f in files:
        part = load_file(tmp_path / "out" / f)
        seen.update({k: f for k in part})
        assert sum(t.numel() * t.element_size() for t in part.values()) <= 0.05 * 2**20 or len(part) == 1
    assert seen == index["weight_map"] and len(seen) == res["tensors"]
    mode = (tmp_path / "out" / "config.json").stat().st_mode  # readable by whoever may read the JSON beside them
    assert {(tmp_path / "out" / f).stat().st_mode for f in files} == {mode}
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        a, b = m(x).logits_BSV, hf(x).logits
    assert float((a - b).abs().max()) < 1e-4 * float(a.abs().max())
    r = cli("export", tmp_path / "moe", "-o", tmp_path / "o0", "--shard-size-mb", "0")
    assert r.returncode == 2 and "--shard-size-mb: must be > 0, got 0.0" in r.stderr and not (tmp_path / "o0").exists()


def test_export_of_a_hugging_face_checkpoint_keeps_its_token_ids(tmp_path, cli):
    from support.hf_models import make

    make("qwen3_moe", tmp_path / "src", eos_token_id=7, bos_token_id=5)
    r = cli("export", tmp_path / "src", "-o", tmp_path / "out", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["format"] == "qwen3_moe" and res["max_abs_logit_diff"] == 0.0
    assert "generation_config.json" in res["copied"]
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["eos_token_id"], cfg["bos_token_id"]) == (7, 5)
