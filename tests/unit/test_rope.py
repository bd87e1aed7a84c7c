"""RoPE variants (model/rope.py) against transformers: tiny random Llama / Qwen2 checkpoints with each rope_type, logits
past the original context, cached greedy tokens, and a Llama 3 upcycled to Mixtral keeping the dense logits."""

import json

import pytest
import torch

from support.hf_models import cached_tokens_equal, logits, make

from moecli.formats.checkpoint import load_checkpoint
from moecli.config import ModelConfig
from moecli.model.rope import apply_rope, cos_sin

VARIANTS = {  # rope_parameters; the original context is 32 where a variant has one, the model's 128
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32},
    "yarn-deepseek": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
                      "beta_fast": 16, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
}


def _model(tmp_path, kind, variant, mpe=128):
    d = tmp_path / f"{kind}-{variant}"
    mpe = 32 if variant == "dynamic" else mpe  # dynamic scales past max_position_embeddings itself
    hf = make(kind, d, max_position_embeddings=mpe, rope_parameters=dict(VARIANTS[variant]))
    return hf, d


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_logits_equal_transformers_past_the_original_context(tmp_path, kind, variant):
    hf, d = _model(tmp_path, kind, variant)
    ours, _ = load_checkpoint(d)
    r = ours.recipe.model
    assert r.rope_type == variant.split("-")[0]
    x = torch.randint(0, 96, (2, 100), generator=torch.Generator().manual_seed(3))  # 100 > the original 32
    ref = logits(hf, x)
    with torch.no_grad():
        got = ours(x).logits_BSV
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    if variant == "dynamic":
        assert r.context == 128 and r.rope_original_context == 32


@pytest.mark.parametrize("variant", ["llama3", "yarn", "dynamic"])
def test_cached_greedy_tokens_equal_transformers(tmp_path, variant):
    hf, d = _model(tmp_path, "llama", variant)
    ours, _ = load_checkpoint(d)
    cached_tokens_equal(hf, ours, 20, 40, vocab=96)


@pytest.mark.parametrize("variant", ["llama3", "yarn"])
def test_export_writes_the_variant_back(tmp_path, cli, variant):
    """A model read from a scaled-RoPE config and exported gives transformers the same config and logits."""
    transformers = pytest.importorskip("transformers")
    hf, d = _model(tmp_path, "llama", variant)
    r = cli("upcycle", d, "-o", tmp_path / "moe", "-e", "4", "-k", "2", "--format", "moecli")
    assert r.returncode == 0, r.stderr
    r = cli("export", tmp_path / "moe", "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == variant and cfg["rope_scaling"] == cfg["rope_parameters"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(0, 96, (1, 90), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(logits(back, x), logits(hf, x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind,variant,expected", [("llama", "llama3", "mixtral"), ("qwen2", "yarn", "qwen2_moe")])
def test_upcycled_scaled_rope_keeps_the_dense_logits(tmp_path, cli, kind, variant, expected):
    """A Llama 3 (llama3 RoPE) and a YaRN Qwen2 upcycled to Hugging Face MoE formats: transformers gives the
    dense model's logits on a sequence past the original context."""
    transformers = pytest.importorskip("transformers")
    hf, d = _model(tmp_path, kind, variant)
    r = cli("upcycle", d, "-o", tmp_path / "moe", "-e", "4", "-k", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["format"] == expected
    moe = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    x = torch.randint(0, 96, (2, 120), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(logits(moe, x), logits(hf, x), rtol=0, atol=1e-4)


def test_rope_config_errors(tmp_path, cli):
    d = tmp_path / "m"
    make("llama", d)
    cfg = json.loads((d / "config.json").read_text())
    for params, msg in (({"rope_type": "longrope", "rope_theta": 1e4}, "rope_type: 'longrope' is not supported"),
                        ({"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}, "low_freq_factor: missing"),
                        ({"rope_type": "linear", "rope_theta": 1e4, "factor": 0.5}, "model.rope_factor: must be >= 1")):
        (d / "config.json").write_text(json.dumps({**cfg, "rope_parameters": params, "rope_scaling": None}))
        r = cli("info", d)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr


def test_partial_rotary_rotates_only_the_first_dims():
    cfg = ModelConfig(d_model=64, n_heads=2, rope_partial=0.25)  # head dim 32: 8 dims rotate
    cos, sin = cos_sin(cfg, 10)
    assert cos.shape == (10, 8)
    x = torch.randn(1, 2, 10, 32)
    y = apply_rope(x, cos, sin)
    assert torch.equal(y[..., 8:], x[..., 8:])
    full = ModelConfig(d_model=16, n_heads=2)  # head dim 8, all rotating, same frequencies as the 8 above
    torch.testing.assert_close(y[..., :8], apply_rope(x[..., :8], *cos_sin(full, 10)))
