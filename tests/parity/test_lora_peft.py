"""A LoRA run on a tiny random transformers checkpoint, exported as a PEFT adapter: peft loads it onto the base
model (transformers 5's fused experts through target_parameters) with the logits of the run's merged export and of
moecli's own reading of the run."""

import json

import pytest
import torch

from support.hf_models import make

from moecli.formats.checkpoint import load_checkpoint

TEXT = "".join(f"Adapter line {i}: a quick brown fox {i * 5 % 11} jumps.\n" for i in range(300))

# family: (transformers overrides, --lora-targets). Mixtral with 2I == H: an adapter transposed by mistake would
# load without an error, with other logits. DeepSeek-V3's dense layer and shared experts are left out: peft reads
# gate_proj / up_proj / down_proj targets of such a model as transformers 4's experts (refused, tested below).
FAMILIES = {
    "mixtral": ({"intermediate_size": 16}, "attention,experts"),
    "qwen3_moe": ({}, "attention,experts,shared,dense"),
    "deepseek_v3": ({}, "attention,experts"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_loads_the_adapter_with_the_merged_logits(tmp_path, cli, family):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    overrides, targets = FAMILIES[family]
    make(family, tmp_path / "base", vocab_size=256, **overrides)
    (tmp_path / "t.txt").write_text(TEXT)
    r = cli("train", "--init", tmp_path / "base", tmp_path / "t.txt", "-o", tmp_path / "run", "--lora", "4",
            "--lora-targets", targets,
            "--lr", "1e-2", "--max-steps", "5", "--seq-len", "32", "--batch-size", "4", "-q", "--json")
    assert r.returncode == 0, r.stderr
    r = cli("export", tmp_path / "run", "-o", tmp_path / "adapter", "--adapter", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["target_parameters"]  # the experts too
    r = cli("export", tmp_path / "run", "-o", tmp_path / "merged", "--json")
    assert r.returncode == 0, r.stderr
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        before = base(x).logits
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ours, _ = load_checkpoint(tmp_path / "run")
    with torch.no_grad():
        theirs, want, mine = adapted(x).logits, merged(x).logits, ours(x).logits_BSV
    assert (want - before).abs().max() > 1e-2  # the adapters moved the model
    torch.testing.assert_close(theirs, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mine, want, rtol=1e-4, atol=1e-4)


def test_an_adapter_is_refused_where_peft_cannot_hold_it(tmp_path, cli):
    make("mixtral", tmp_path / "base", vocab_size=256)
    (tmp_path / "t.txt").write_text(TEXT)
    plain = cli("train", "--init", tmp_path / "base", tmp_path / "t.txt", "-o", tmp_path / "full", "--max-steps", "1",
                "--seq-len", "32", "--batch-size", "4", "-q")
    assert plain.returncode == 0, plain.stderr
    r = cli("export", tmp_path / "full", "-o", tmp_path / "a", "--adapter")
    assert r.returncode == 2 and "not a LoRA run" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    routed = cli("train", "--init", tmp_path / "base", tmp_path / "t.txt", "-o", tmp_path / "router", "--lora", "2",
                 "--lora-targets", "attention,router", "--max-steps", "1", "--seq-len", "32", "--batch-size", "4", "-q")
    assert routed.returncode == 0, routed.stderr
    r = cli("export", tmp_path / "router", "-o", tmp_path / "a", "--adapter")
    assert r.returncode == 2 and "a router adapter is not written as PEFT" in r.stderr
    make("deepseek_v3", tmp_path / "ds", vocab_size=256)
    dense = cli("train", "--init", tmp_path / "ds", tmp_path / "t.txt", "-o", tmp_path / "dense", "--lora", "2",
                "--max-steps", "1", "--seq-len", "32", "--batch-size", "4", "-q")
    assert dense.returncode == 0, dense.stderr
    r = cli("export", tmp_path / "dense", "-o", tmp_path / "a", "--adapter")
    assert r.returncode == 2 and "peft reads model.layers.0.mlp.down_proj" in r.stderr, r.stderr
    assert not (tmp_path / "a").exists()
