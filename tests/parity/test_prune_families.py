"""moe prune on tiny random transformers checkpoints of every MoE family moecli reads: the output is the same
family, transformers loads it as the same class with moecli's logits, and it holds exactly the kept experts (router
rows and biases too) of the source with everything else as it was."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from support.hf_models import make

from moecli.commands.prune import PruneOptions, prune, write_pruned
from moecli.formats.checkpoint import load_checkpoint, open_checkpoint

# family: (--keep, transformers overrides); group-limited ones keep a multiple of n_group
FAMILIES = {
    "mixtral": (3, {}),
    "qwen2_moe": (4, {}),
    "qwen3_moe": (4, {}),
    "olmoe": (4, {}),
    "deepseek_v2": (4, {}),  # 4 groups, topk_group 2: one expert per group
    "deepseek_v3": (4, {}),  # 2 groups of 4 -> 2 of 2
    "glm4_moe": (4, {}),
    "gpt_oss": (4, {}),
    "llama4_text": (2, {}),
    "qwen3_next": (4, {}),
}
TEXT = "".join(f"Calibration line {i}: the quick brown fox {i * 7 % 11} jumps over the lazy dog.\n" for i in range(90))


def moecli_logits(directory, x):
    model, _ = load_checkpoint(directory)
    with torch.no_grad():
        return model(x).logits_BSV, model


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_family_loads_in_transformers_with_moeclis_logits(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    keep, extra = FAMILIES[family]
    source = make(family, tmp_path / "src", vocab_size=256, **extra)
    (tmp_path / "t.txt").write_text(TEXT)
    res = prune(str(tmp_path / "src"), [str(tmp_path / "t.txt")], tmp_path / "out",
                PruneOptions(keep=keep, seq_len=32, holdout=0.2))
    src_cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    changed = {k for k in src_cfg if src_cfg[k] != out_cfg.get(k)}
    assert len(changed) == 1 and out_cfg[changed.pop()] == keep  # the expert count, nothing else
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf) is type(source)
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    ours, pruned = moecli_logits(tmp_path / "out", x)
    with torch.no_grad():
        theirs = hf(x).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    _, whole = moecli_logits(tmp_path / "src", x)
    assert_holds_the_kept_experts(whole, pruned, {int(i): L["kept"] for i, L in res["layers"].items()})
    groups = whole.recipe.moe.n_groups
    if groups > 1:  # group-limited routing: every group keeps the same number
        size = whole.recipe.moe.num_experts // groups
        for L in res["layers"].values():
            assert [sum(e // size == g for e in L["kept"]) for g in range(groups)] == [keep // groups] * groups
    assert res["loss_before"] > 0 and res["loss_after"] > 0 and res["heldout_tokens"] > 0


def assert_holds_the_kept_experts(whole, pruned, kept):
    """The pruned model's tensors are the source's, each MoE layer's routed experts and router rows cut to kept."""
    src, out = whole.state_dict(), pruned.state_dict()
    assert src.keys() == out.keys()
    for name, t in src.items():
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        if layer in kept and (".moe.experts." in name or ".moe.router." in name):
            t = t[kept[layer]]
        assert torch.equal(out[name], t), name


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_keeping_every_expert_is_the_identity(tmp_path, family):
    make(family, tmp_path / "src", vocab_size=256)
    ckpt = open_checkpoint(tmp_path / "src")
    E = ckpt.recipe.moe.num_experts
    (tmp_path / "out").mkdir()
    write_pruned(ckpt, tmp_path / "out", {i: list(range(E)) for i in ckpt.recipe.moe_layer_indices()}, {})
    x = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(3))
    assert torch.equal(moecli_logits(tmp_path / "src", x)[0], moecli_logits(tmp_path / "out", x)[0])
    for f in (tmp_path / "src").glob("*.safetensors"):  # every stored tensor as it was, under its name
        a, b = load_file(f), load_file(tmp_path / "out" / f.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_a_multimodal_llama4_keeps_its_container_and_its_other_towers(tmp_path):
    """Llama4ForConditionalGeneration as the hub holds it: text_config's expert count is the one cut, the language
    model's experts under language_model.model.* are sliced, the vision tower is copied as it was."""
    make("llama4_text", tmp_path / "text", vocab_size=256)
    text_cfg = json.loads((tmp_path / "text" / "config.json").read_text())
    d = tmp_path / "mm"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama4", "architectures": [
        "Llama4ForConditionalGeneration"], "text_config": text_cfg, "vision_config": {"hidden_size": 8}}))
    sd = {("language_model.model." + k[len("model."):] if k.startswith("model.") else "language_model." + k): v
          for k, v in load_file(tmp_path / "text" / "model.safetensors").items()}
    sd["vision_model.patch_embedding.linear.weight"] = torch.arange(64.0).view(8, 8)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "t.txt").write_text(TEXT)
    res = prune(str(d), [str(tmp_path / "t.txt")], tmp_path / "out", PruneOptions(keep=2, seq_len=32, holdout=0))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "llama4" and cfg["text_config"]["num_local_experts"] == 2
    assert cfg["vision_config"] == {"hidden_size": 8}
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(out["vision_model.patch_embedding.linear.weight"], sd["vision_model.patch_embedding.linear.weight"])
    x = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(2))
    _, whole = moecli_logits(d, x)
    _, pruned = moecli_logits(tmp_path / "out", x)
    assert_holds_the_kept_experts(whole, pruned, {int(i): L["kept"] for i, L in res["layers"].items()})
