"""moe upcycle BASE --expert A --expert B: experts from several dense models (mergekit-moe's use), router rows from
each expert's prompts, and the layer-by-layer verification's memory bound."""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from support.hf_models import make

from moecli.formats.checkpoint import load_checkpoint

transformers = pytest.importorskip("transformers")


@pytest.fixture
def llamas(tmp_path):
    """A base and two other dense Llamas of its shape (different weights), vocab 256 (byte tokens)."""
    return [make("llama", tmp_path / name, seed=seed, vocab_size=256) and tmp_path / name
            for name, seed in (("base", 0), ("code", 1), ("math", 2))]


def test_each_expert_is_its_sources_ffn_and_transformers_loads_it(tmp_path, cli, llamas):
    base, a, b = llamas
    r = cli("upcycle", base, "-o", tmp_path / "moe", "--expert", a, "--expert", b, "--expert", a, "-k", "2",
            "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["num_experts"] == 3 and out["format"] == "mixtral" and not out["exact"]
    assert set(out["per_source_layer_diff"]) == {str(a), str(b)} and "several sources" in out["verified"]
    assert all(len(v) == 2 and all(d > 0 for d in v) for v in out["per_source_layer_diff"].values())
    moe = load_file(tmp_path / "moe" / "model.safetensors")
    dense = {d: load_file(d / "model.safetensors") for d in llamas}
    for i in range(2):
        for e, src in enumerate((a, b, a)):
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                assert torch.equal(moe[f"model.layers.{i}.block_sparse_moe.experts.{e}.{ours}.weight"],
                                   dense[src][f"model.layers.{i}.mlp.{theirs}.weight"])
        for k in ("self_attn.q_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"):
            assert torch.equal(moe[f"model.layers.{i}.{k}"], dense[base][f"model.layers.{i}.{k}"])
    assert torch.equal(moe["model.embed_tokens.weight"], dense[base]["model.embed_tokens.weight"])
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert type(back).__name__ == "MixtralForCausalLM"
    ours, _ = load_checkpoint(tmp_path / "moe")
    x = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits_BSV, back(x).logits, rtol=0, atol=1e-4)


def test_a_shared_expert_is_the_bases_ffn_and_sources_compose_with_granularity(tmp_path, cli, llamas):
    base, a, b = llamas
    r = cli("upcycle", base, "-o", tmp_path / "moe", "--expert", a, "--expert", b, "--granularity", "2", "-k", "2",
            "--shared-experts", "1", "--format", "qwen2_moe", "--allow-inexact", "--json")
    assert r.returncode == 2 and "qwen2_moe" in r.stderr  # a Llama base has no q/k/v biases for Qwen2-MoE
    r = cli("upcycle", base, "-o", tmp_path / "moe", "--expert", a, "--expert", b, "--granularity", "2", "-k", "2",
            "--shared-experts", "1", "--format", "moecli", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["num_experts"] == 4
    sd = load_file(tmp_path / "moe" / "model.safetensors")
    dense = {d: load_file(d / "model.safetensors") for d in llamas}
    gate = sd["layers.1.moe.experts.w1_EDF"]  # E x D x F/2: expert 2 is source b's first half
    F = gate.shape[2]
    assert torch.equal(gate[2], dense[b]["model.layers.1.mlp.gate_proj.weight"][:F].t())
    assert torch.equal(gate[1], dense[a]["model.layers.1.mlp.gate_proj.weight"][F:].t())
    assert torch.equal(sd["layers.1.moe.shared.w2.weight"], dense[base]["model.layers.1.mlp.down_proj.weight"])
    assert sd["layers.1.moe.experts.w2_EFD"].abs().max() > 0  # the sources' FFNs, not a zero residual


def test_a_source_of_another_shape_is_refused_naming_it_and_the_tensor(tmp_path, cli, llamas):
    base, a, _ = llamas
    wide = tmp_path / "wide"
    make("llama", wide, vocab_size=256, intermediate_size=64)
    r = cli("upcycle", base, "-o", tmp_path / "moe", "--expert", a, "--expert", wide)
    assert r.returncode == 2
    assert str(wide) in r.stderr and "model.layers.0.mlp.gate_proj.weight" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "moe").exists()
    r = cli("upcycle", base, "-o", tmp_path / "moe", "--expert", a, "-e", "4")
    assert r.returncode == 2 and "num_experts" in r.stderr


@pytest.mark.parametrize("negatives", [False, True])
def test_router_rows_from_each_experts_prompts_route_its_prompts_to_it(tmp_path, cli, llamas, negatives):
    """Constructed case: the base twice as the experts (so the MoE's hidden states are the base's), expert 0's
    prompts runs of 'a', expert 1's runs of 'z' (with negatives: each the other's): at every layer each token of a
    prompt from expert i's file goes to expert i first."""
    base, _, _ = llamas
    files = {}
    for name, text in (("a", "a" * 12), ("z", "z" * 9)):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text("\n".join(text[: n] for n in range(3, len(text) + 1, 3)) + "\n")
    opts = tmp_path / "opts.yaml"
    opts.write_text(json.dumps({"top_k": 1, "format": "moecli", "experts": [
        {"source": str(base), "prompts": str(files["a"]), **({"negative_prompts": str(files["z"])} if negatives else {})},
        {"source": str(base), "prompts": str(files["z"]), **({"negative_prompts": str(files["a"])} if negatives else {})},
    ]}))
    r = cli("upcycle", base, "-o", tmp_path / "moe", "-c", opts, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["router_init"] == "prompts" and out["exact"] and out["max_abs_logit_diff"] < 1e-4
    ours, _ = load_checkpoint(tmp_path / "moe")
    for _, moe in ours.moe_layers:
        moe.capture = True
    for expert, name in ((0, "a"), (1, "z")):
        for line in files[name].read_text().split():
            with torch.no_grad():
                ours(torch.tensor([list(line.encode())]))
            for i, moe in ours.moe_layers:
                assert (moe.last_route.idx_TK[:, 0] == expert).all(), (name, line, i)


def test_an_expert_without_prompts_under_prompt_routing_is_refused(tmp_path, cli, llamas):
    base, a, b = llamas
    opts = tmp_path / "opts.yaml"
    opts.write_text(json.dumps({"router_init": "prompts", "experts": [{"source": str(a)}, {"source": str(b)}]}))
    r = cli("upcycle", base, "-o", tmp_path / "moe", "-c", opts)
    assert r.returncode == 2 and "experts[0].prompts" in r.stderr
    opts.write_text(json.dumps({"experts": [{"source": str(a), "prompt": "x"}]}))
    r = cli("upcycle", base, "-o", tmp_path / "moe", "-c", opts)
    assert r.returncode == 2 and "experts[0].prompt" in r.stderr and "unknown key" in r.stderr


def _peak_rss(cmd) -> int:
    pid = os.fork()
    if pid == 0:
        os.execvp(cmd[0], cmd)
    _, status, usage = os.wait4(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, cmd
    return usage.ru_maxrss * 1024


def test_layer_by_layer_verification_stays_within_one_and_a_half_times_the_unverified_peak(tmp_path, cli):
    """A 16-expert upcycle of a 0.19 GB dense model (1.6 GB out): the verified run's peak RSS (read from the OS in
    a subprocess) is within 1.5x the --no-verify run's; loading both whole models would add about 1.8 GB."""
    dense = tmp_path / "dense"
    r = cli("build", "dense", "-o", dense, "--set", "model.n_layers=8", "--set", "model.d_model=512",
            "--set", "model.ffn_dim=2048", "--set", "model.n_heads=8", "--seed", "1")
    assert r.returncode == 0, r.stderr
    base = [sys.executable, "-m", "moecli.cli", "upcycle", str(dense), "-e", "16", "-k", "2", "--json"]
    unverified = _peak_rss(base + ["-o", str(tmp_path / "a"), "--no-verify"])
    verified = _peak_rss(base + ["-o", str(tmp_path / "b")])
    size = (tmp_path / "b" / "model.safetensors").stat().st_size
    assert size > 1.5e9
    assert verified <= 1.5 * unverified, (verified / 1e9, unverified / 1e9)


def test_a_mixtral_in_transformers_5_names_is_read(tmp_path, cli):
    """mergekit-moe (and transformers 5) write Mixtral's MoE as model.layers.i.mlp.gate and the fused
    mlp.experts.gate_up_proj (E, 2F, D) / down_proj (E, D, F): read with the logits of the per-expert layout."""
    from safetensors.torch import save_file

    hf = make("mixtral", tmp_path / "a", vocab_size=256)
    sd = load_file(tmp_path / "a" / "model.safetensors")
    out = {k: v for k, v in sd.items() if ".block_sparse_moe." not in k}
    for i in range(2):
        P = f"model.layers.{i}.block_sparse_moe"
        out[f"model.layers.{i}.mlp.gate.weight"] = sd[f"{P}.gate.weight"]
        E = sd[f"{P}.gate.weight"].shape[0]
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([sd[f"{P}.experts.{e}.w1.weight"], sd[f"{P}.experts.{e}.w3.weight"]]) for e in range(E)])
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([sd[f"{P}.experts.{e}.w2.weight"]
                                                                      for e in range(E)])
    (tmp_path / "b").mkdir()
    save_file(out, tmp_path / "b" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "b" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    ours, _ = load_checkpoint(tmp_path / "b")
    x = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits_BSV, hf(x).logits, rtol=0, atol=1e-5)


def test_qwen2_sources_with_tied_embeddings_and_wide_heads_compose_with_noise_and_drop(tmp_path, cli):
    """Qwen2 bases (q/k/v biases), tied embeddings, head_dim 16 != 32 / 4, as three sources with noise and
    Drop-Upcycling: Qwen2-MoE that transformers loads with moecli's logits; each expert near its own source's FFN."""
    shape = dict(vocab_size=256, tie_word_embeddings=True, head_dim=16)
    dirs = []
    for seed in range(3):
        make("qwen2", tmp_path / f"q{seed}", seed=seed, **shape)
        dirs.append(tmp_path / f"q{seed}")
    r = cli("upcycle", dirs[0], "-o", tmp_path / "moe", "--expert", dirs[1], "--expert", dirs[2], "--expert", dirs[0],
            "-k", "2", "--noise", "0.01", "--drop-ratio", "0.25", "--allow-inexact", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["format"] == "qwen2_moe"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    ours, _ = load_checkpoint(tmp_path / "moe")
    x = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits_BSV, back(x).logits, rtol=0, atol=1e-4)
    moe = load_file(tmp_path / "moe" / "model.safetensors")
    for e, src in enumerate((dirs[1], dirs[2], dirs[0])):
        theirs = load_file(src / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
        mine = moe[f"model.layers.0.mlp.experts.{e}.up_proj.weight"]
        kept = (mine == theirs).all(dim=1).float().mean()  # drop 25% of hidden units, noise on all
        close = torch.corrcoef(torch.stack([mine.flatten(), theirs.flatten()]))[0, 1]
        assert kept == 0 and close > 0.7
