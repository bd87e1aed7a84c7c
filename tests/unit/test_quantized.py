"""Quantized checkpoints read on the CPU: block-scaled FP8 (DeepSeek-V3's layout) and MXFP4 (GPT-OSS's experts),
each written here from a tiny random transformers model by a quantizer of the test's own, beside the same model with
the dequantized weights in float32: moecli's loss and routing on the quantized directory equal the dequantized
model's."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from support.hf_models import make

from moecli.formats.checkpoint import load_checkpoint

FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def fp8_quantize(w, block):
    """(fp8 weight, scale_inv per block, the dequantized weight)."""
    R, C = w.shape
    br, bc = block
    nr, nc = -(-R // br), -(-C // bc)
    scale = torch.zeros(nr, nc)
    for i in range(nr):
        for j in range(nc):
            scale[i, j] = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc].abs().max().clamp_min(1e-12) / 448.0
    full = scale.repeat_interleave(br, 0)[:R].repeat_interleave(bc, 1)[:, :C]
    q = (w / full).to(torch.float8_e4m3fn)
    return q, scale, q.float() * full


def mxfp4_quantize(w):
    """w (..., K) with K a multiple of 32 -> (blocks (..., K/32, 16) uint8, scales (..., K/32) uint8, dequantized)."""
    g = w.unflatten(-1, (-1, 32))
    e = torch.ceil(torch.log2(g.abs().amax(-1).clamp_min(1e-30) / 6.0)).clamp(-127, 127)
    x = g / torch.exp2(e).unsqueeze(-1)
    idx = (x.unsqueeze(-1) - FP4).abs().argmin(-1)  # nearest FP4 value
    blocks = (idx[..., 0::2] | (idx[..., 1::2] << 4)).to(torch.uint8)
    deq = (FP4[idx] * torch.exp2(e).unsqueeze(-1)).flatten(-2)
    return blocks, (e + 127).to(torch.uint8), deq


def loss_and_routes(d, x):
    model, _ = load_checkpoint(d)
    for _, moe in model.moe_layers:
        moe.capture = True
    with torch.no_grad():
        logits = model(x).logits_BSV
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:])
    return float(loss), [moe.last_route.idx_TK for _, moe in model.moe_layers], logits


def assert_same(q, deq, x):
    lq, rq, gq = loss_and_routes(q, x)
    ld, rd, gd = loss_and_routes(deq, x)
    assert lq == pytest.approx(ld, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(rq, rd))
    torch.testing.assert_close(gq, gd, rtol=0, atol=1e-5)


def write_pair(tmp_path, quantized: dict, dequantized: dict, quantization: dict) -> None:
    """tmp_path/q (the quantized tensors, config with ``quantization``) and tmp_path/deq (the dequantized ones) beside
    tmp_path/src: moecli reads both to the same loss, routing and logits."""
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    for name, tensors, extra in (("q", quantized, {"quantization_config": quantization}), ("deq", dequantized, {})):
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
        (tmp_path / name / "config.json").write_text(json.dumps({**cfg, **extra}))
    assert_same(tmp_path / "q", tmp_path / "deq", torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(2)))


def fp8_pair(tmp_path):
    """tmp_path/q: a tiny DeepSeek-V3 with block-scaled FP8 attention, shared and routed experts; tmp_path/deq:
    the same with the dequantized weights."""
    make("deepseek_v3", tmp_path / "src", vocab_size=256)
    sd = load_file(tmp_path / "src" / "model.safetensors")
    block = (16, 16)  # the tiny dims (24, 32, 48, ...) give whole and partial blocks
    quantized, dequantized = {}, {}
    for k, v in sd.items():
        if k.endswith("proj.weight") or k.endswith("proj_with_mqa.weight"):  # attention, shared and routed experts
            q, s, deq = fp8_quantize(v, block)
            quantized[k], quantized[k + "_scale_inv"], dequantized[k] = q, s, deq
        else:
            quantized[k] = dequantized[k] = v
    assert sum(v.dtype == torch.float8_e4m3fn for v in quantized.values()) > 20
    write_pair(tmp_path, quantized, dequantized, {"quant_method": "fp8", "weight_block_size": list(block),
                                                  "activation_scheme": "dynamic"})


def test_fp8_block_scaled_deepseek_v3_reads_as_its_dequantized_weights(tmp_path, cli):
    fp8_pair(tmp_path)
    r = cli("info", tmp_path / "q", "--json")
    assert r.returncode == 0, r.stderr
    assert "float8_e4m3fn" in json.loads(r.stdout)["weights"]["dtypes"]
    text = tmp_path / "t.txt"
    text.write_text("block-scaled eight-bit weights\n" * 30)
    for flags, dtype, d in (((), "bfloat16", "q"), (("--dtype", "float32"), "float32", "q"), ((), "float32", "deq")):
        r = cli("eval", tmp_path / d, text, *flags, "--json")  # auto: bfloat16 for a quantized checkpoint
        assert r.returncode == 0 and json.loads(r.stdout)["dtype"] == dtype, r.stderr


def mxfp4_pair(tmp_path):
    """tmp_path/q: a tiny GPT-OSS with MXFP4 experts; tmp_path/deq: the same with the dequantized weights."""
    make("gpt_oss", tmp_path / "src", vocab_size=256, intermediate_size=32)  # FP4 blocks of 32 along D and F
    sd = load_file(tmp_path / "src" / "model.safetensors")
    quantized, dequantized = {}, {}
    for k, v in sd.items():
        if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj"):
            blocks, scales, deq = mxfp4_quantize(v.transpose(1, 2))  # stored (E, out, in), blocks along in
            quantized[k + "_blocks"], quantized[k + "_scales"] = blocks, scales
            dequantized[k] = deq.transpose(1, 2).contiguous()
        else:
            quantized[k] = dequantized[k] = v
    write_pair(tmp_path, quantized, dequantized, {"quant_method": "mxfp4"})


def test_mxfp4_gpt_oss_experts_read_as_their_dequantized_weights(tmp_path, cli):
    mxfp4_pair(tmp_path)
    text = tmp_path / "t.txt"
    text.write_text("packed four-bit experts, scaled by powers of two\n" * 20)
    r = cli("inspect-routing", tmp_path / "q", text, "--json")
    assert r.returncode == 0, r.stderr


def test_an_unknown_quantization_is_refused_in_one_line(tmp_path, cli):
    make("llama", tmp_path, vocab_size=256)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq"}}))
    r = cli("info", tmp_path)
    assert r.returncode == 2 and "gptq" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_mxfp4_dequantization_equals_transformers():
    """The nibble order, E8M0 exponent and layout of quant.mxfp4_dequant against transformers' own unpacking."""
    pytest.importorskip("transformers")
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from moecli.formats.quant import mxfp4_dequant

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 8, 2, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(120, 134, (3, 8, 2), generator=g, dtype=torch.uint8)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # (E, in, out)
    assert torch.equal(mxfp4_dequant(blocks, scales, torch.float32).transpose(1, 2), theirs)


@pytest.mark.parametrize("kind", ["fp8", "mxfp4"])
def test_pruned_quantized_experts_stay_quantized_and_read_as_the_pruned_dequantized_ones(tmp_path, kind):
    """moe prune slices whole experts: the FP8 blocks and scales, the MXFP4 blocks and scales of the kept experts
    are written as stored, and read as the same pruned model as the dequantized checkpoint pruned alike (the
    dequantized one calibrated; its scores reused: the routers, not quantized, give both one fingerprint)."""
    from moecli.commands.prune import PruneOptions, prune

    if kind == "fp8":
        fp8_pair(tmp_path)
        keep, quantized_dtype = 4, torch.float8_e4m3fn
    else:
        mxfp4_pair(tmp_path)
        keep, quantized_dtype = 6, torch.uint8
    (tmp_path / "c.txt").write_text("a calibration text for the pruned experts, line after line\n" * 40)
    prune(str(tmp_path / "deq"), [str(tmp_path / "c.txt")], tmp_path / "deq-p",
          PruneOptions(keep=keep, seq_len=32, holdout=0))
    res = prune(str(tmp_path / "q"), [], tmp_path / "q-p", PruneOptions(keep=keep, scores=str(tmp_path / "deq-p" /
                                                                                                "prune_scores.json")))
    assert res["keep"] == keep and "loss_before" not in res
    before, after = load_file(tmp_path / "q" / "model.safetensors"), load_file(tmp_path / "q-p" / "model.safetensors")

    def quantized_expert_numel(sd):  # the routed experts' quantized bytes (not the shared experts')
        return sum(v.numel() for k, v in sd.items() if v.dtype == quantized_dtype and ".experts." in k)

    assert quantized_expert_numel(after) * 8 == quantized_expert_numel(before) * keep > 0  # 8 experts -> keep
    assert_same(tmp_path / "q-p", tmp_path / "deq-p", torch.randint(0, 256, (1, 60),
                                                                    generator=torch.Generator().manual_seed(5)))

