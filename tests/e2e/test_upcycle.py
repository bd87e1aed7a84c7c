"""moe upcycle: function preservation (own and Hugging Face formats), refusals, streaming outputs."""

import json

import pytest
import torch

from moecli.formats.checkpoint import load_checkpoint
from moecli.commands.upcycle import UpcycleOptions, upcycle

from support.hf_models import logits, make


@pytest.fixture
def dense_ckpt(tmp_path, cli):
    out = tmp_path / "dense"
    r = cli("build", "dense", "-o", out, "--set", "model.n_layers=3", "--set", "model.ffn_dim=96", "--seed", "5")
    assert r.returncode == 0, r.stderr
    return out


def probe(model, vocab=256):
    x = torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(x).logits_BSV


@pytest.mark.parametrize("opts", [
    dict(num_experts=8, top_k=2),
    dict(num_experts=4, top_k=1, router_init="zero"),
    dict(num_experts=16, top_k=4, granularity=2),  # granular upcycling with virtual groups
    dict(num_experts=12, top_k=6, granularity=3, first_k_dense=1),
    dict(num_experts=8, top_k=2, shared_experts=1, router_init="prompts"),
    dict(num_experts=8, top_k=2, moe_every_n=2),
])
def test_moecli_upcycle_preserves_function(tmp_path, dense_ckpt, opts):
    out = tmp_path / "moe"
    res = upcycle(str(dense_ckpt), out, UpcycleOptions(**opts))
    assert res["exact"] and res["max_abs_logit_diff"] < 1e-5
    dense, _ = load_checkpoint(dense_ckpt)
    moe, cfg = load_checkpoint(out)
    assert moe.recipe.moe.num_experts == opts["num_experts"]
    assert len(moe.moe_layers) == len(res["moe_layers"]) > 0
    torch.testing.assert_close(probe(moe), probe(dense), rtol=0, atol=1e-5)
    assert cfg["source"]["upcycle"]["num_experts"] == opts["num_experts"]


def test_inexact_options_are_refused_then_reported(tmp_path, dense_ckpt, cli):
    out = tmp_path / "moe"
    r = cli("upcycle", dense_ckpt, "-o", out, "--num-experts", "8", "--top-k", "3", "--granularity", "2")
    assert r.returncode == 2
    assert "not function-preserving" in r.stderr and "not a multiple of granularity" in r.stderr
    assert not out.exists()
    r = cli("upcycle", dense_ckpt, "-o", out, "-e", "8", "-k", "2", "--drop-ratio", "0.5", "--allow-inexact", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert not res["exact"] and res["max_abs_logit_diff"] > 1e-4


def test_drop_upcycling_reinitialises_r_of_each_expert(tmp_path, dense_ckpt):
    out = tmp_path / "moe"
    upcycle(str(dense_ckpt), out, UpcycleOptions(num_experts=4, top_k=2, drop_ratio=0.25), allow_inexact=True)
    dense, _ = load_checkpoint(dense_ckpt)
    moe, _ = load_checkpoint(out)
    w1_dense = dense.layers[0].feed_forward.w1.weight.t()  # (D, F)
    w1 = moe.layers[0].moe.experts.w1_EDF  # (E, D, F)
    changed = [(w1[e] != w1_dense).any(dim=0) for e in range(4)]  # hidden units that differ
    for c in changed:
        assert c.sum().item() == round(0.25 * 96)
    assert not torch.equal(changed[0], changed[1])  # each expert re-draws different units


def test_dry_run_writes_nothing_and_existing_output_kept(tmp_path, dense_ckpt, cli):
    out = tmp_path / "moe"
    r = cli("upcycle", dense_ckpt, "-o", out, "-e", "4", "-k", "2", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert not out.exists()
    assert plan["output_bytes"] > plan["input_bytes"] and plan["memory_estimate_bytes"] < plan["output_bytes"]
    assert any(p["name"].endswith("w1_EDF") and p["shape"][0] == 4 for p in plan["plan"])
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = cli("upcycle", dense_ckpt, "-o", out, "-e", "4", "-k", "2")
    assert r.returncode == 2 and "not empty" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"
    r = cli("upcycle", dense_ckpt, "-o", dense_ckpt, "-e", "4", "-k", "2", "--force")
    assert r.returncode == 2 and "must not be the input" in r.stderr


def test_option_errors(tmp_path, dense_ckpt, cli):
    y = tmp_path / "up.yaml"
    y.write_text("num_experts: 8\ntop_k: 2\nrouter_inti: zero\n")
    r = cli("upcycle", dense_ckpt, "-o", tmp_path / "o", "--config", y)
    assert r.returncode == 2 and "up.yaml: upcycle.router_inti: unknown key (did you mean 'router_init'?)" in r.stderr
    r = cli("upcycle", dense_ckpt, "-o", tmp_path / "o", "-e", "4", "-k", "5")
    assert r.returncode == 2 and "top_k: must be between 1 and num_experts (4)" in r.stderr
    y.write_text("num_experts: 8\ntop_k: 2\n")
    r = cli("upcycle", dense_ckpt, "-o", tmp_path / "o", "--config", y, "--top-k", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["top_k"] == 1  # the flag wins over the YAML
    # "-c -": the options from stdin ("cannot read: No such file or directory" before); text that is not UTF-8
    r = cli("upcycle", dense_ckpt, "--dry-run", "--json", "-c", "-", input="num_experts: 6\ntop_k: 3\n")
    assert r.returncode == 0, r.stderr
    assert (json.loads(r.stdout)["num_experts"], json.loads(r.stdout)["top_k"]) == (6, 3)
    r = cli("upcycle", dense_ckpt, "--dry-run", "-c", "-", input="top_k: many\n")
    assert r.returncode == 2 and "<stdin>: upcycle.top_k: " in r.stderr
    y.write_bytes(b"\xff\xfenum_experts: 8\n")
    r = cli("upcycle", dense_ckpt, "-o", tmp_path / "q", "--config", y)  # was "unexpected UnicodeDecodeError"
    assert r.returncode == 2 and "up.yaml: cannot read: not UTF-8 text" in r.stderr
    r = cli("upcycle", dense_ckpt, "-o", tmp_path / "p", "--router-init", "prompts", "--prompts", tmp_path / "no.txt")
    assert r.returncode == 2 and "no.txt: cannot read prompts" in r.stderr
    moe_dir = tmp_path / "o"
    r = cli("upcycle", moe_dir, "-o", tmp_path / "o2")
    assert r.returncode == 2 and "already a mixture-of-experts" in r.stderr
    r = cli("upcycle", dense_ckpt, "-o", tmp_path / "o3", "--granularity", "2", "-e", "8", "-k", "2",
            "--format", "mixtral")
    assert r.returncode == 2 and "cannot express" in r.stderr and "(--format moecli)" in r.stderr


@pytest.mark.parametrize("kind,expected", [("llama", "mixtral"), ("mistral", "mixtral"), ("qwen3", "qwen3_moe"),
                                           ("qwen2", "qwen2_moe")])
def test_hf_dense_to_hf_moe_loads_in_transformers(tmp_path, cli, kind, expected):
    transformers = pytest.importorskip("transformers")
    src = tmp_path / kind
    dense = make(kind, src, _shard="20KB")  # sharded input with an index json
    assert (src / "model.safetensors.index.json").is_file()
    (src / "tokenizer_config.json").write_text("{}")
    out = tmp_path / "moe"
    r = cli("upcycle", src, "-o", out, "-e", "4", "-k", "2", "--shard-size-mb", "0.02", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["format"] == expected and res["exact"] and res["shards"] > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert any(".experts.3." in k for k in index["weight_map"])  # per-expert tensor names on disk
    assert (out / "tokenizer_config.json").is_file()
    moe = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert moe.config.model_type == expected
    x = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(moe, x), logits(dense, x), rtol=0, atol=1e-4)
    # and moecli reads the Hugging Face MoE it wrote
    ours, _ = load_checkpoint(out)
    torch.testing.assert_close(probe(ours, 96), probe(load_checkpoint(src)[0], 96), rtol=0, atol=1e-4)


def test_hf_dense_to_moecli_format(tmp_path):
    pytest.importorskip("transformers")
    src = tmp_path / "llama"
    make("llama", src)
    out = tmp_path / "moe"
    res = upcycle(str(src), out, UpcycleOptions(num_experts=6, top_k=3, granularity=3, format="moecli"))
    assert res["exact"] and res["max_abs_logit_diff"] < 1e-5
    assert (out / "model.safetensors").is_file() and json.loads((out / "config.json").read_text())["format"]


@pytest.mark.parametrize("kind,expected", [("llama", "mixtral"),
                                           ("qwen2", "qwen2_moe"),
                                           ("qwen3", "qwen3_moe")])
def test_hugging_face_chain_end_to_end(tmp_path, cli, kind, expected):
    """The README's chain on a pretrained-style dense model: upcycle -> train --init -> eval -> inspect-routing ->
    export, each step checked: the upcycled model scores the dense model's loss, the fine-tune keeps it, and
    transformers loads the export with moecli's loss."""
    transformers = pytest.importorskip("transformers")
    src = tmp_path / kind
    make(kind, src, vocab_size=256, max_position_embeddings=128)  # the byte tokenizer: no tokenizer.json needed
    text = tmp_path / "t.txt"
    text.write_text("".join(f"the {i % 5} quick brown foxes jump over {i % 3} lazy dogs\n" for i in range(300)))

    def run(*args):
        r = cli(*args, "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    dense = run("eval", src, text)
    up = run("upcycle", src, "-o", tmp_path / "moe", "-e", "4", "-k", "2")
    assert up["format"] == expected and up["exact"]
    assert run("eval", tmp_path / "moe", text)["loss"] == pytest.approx(dense["loss"], rel=1e-5)
    ft = run("train", "--init", tmp_path / "moe", text, "-o", tmp_path / "run", "--max-steps", "2", "--batch-size", "4",
             "--seq-len", "64", "-q")
    assert ft["finetune_defaults"]["lr"] == 2e-5
    tuned = run("eval", tmp_path / "run", text, "--seq-len", "128")
    assert tuned["loss"] == pytest.approx(dense["loss"], abs=0.05)  # two steps at lr 2e-5 barely move it
    routing = run("inspect-routing", tmp_path / "run", text)
    assert set(routing["layers"]) == {"0", "1"} and routing["seq_len"] == 64  # a moecli run: its training length
    exp = run("export", tmp_path / "run", "-o", tmp_path / "hf")
    assert exp["format"] == expected
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor(list(text.read_bytes()))
    starts = range(0, (ids.numel() - 1) // 128 * 128, 128)
    with torch.no_grad():
        losses = [hf(ids[s: s + 129][None], labels=ids[s: s + 129][None]).loss for s in starts]
    assert float(sum(losses) / len(losses)) == pytest.approx(tuned["loss"], rel=1e-4)
