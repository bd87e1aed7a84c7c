"""moe train --init CKPT --train-experts (ESFT): only the chosen experts change, the rest stays bit-identical, the
loss falls, AdamW state exists only for what trains, the memory estimate counts only that, a resume continues
exactly with the same experts, and bad specs are refused in one line."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moecli.training.setup import TrainArgs
from moecli.training.trainer import train

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}.\n" for i in range(500))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny MoE pretrained a few steps (the model --init starts from) and the text to fine-tune on."""
    import yaml

    d = tmp_path_factory.mktemp("esft")
    (d / "t.txt").write_text(TEXT)
    (d / "tiny.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64,
                                  "context": 64},
        "moe": {"num_experts": 8, "top_k": 2, "expert_ffn": 32},
        "train": {"batch_size": 4, "seq_len": 32, "max_steps": 4, "warmup_steps": 1, "eval_interval": 4,
                  "eval_batches": 1}}))
    train(TrainArgs(str(d / "tiny.yaml"), [str(d / "t.txt")], d / "pre", {}, quiet=True))
    return d


def esft(base, out, spec, **over):
    ov = {"train.max_steps": 12, "train.lr": 3e-3, "train.eval_interval": 6, "train.eval_batches": 2, **over}
    return train(TrainArgs(None, [str(base / "t.txt")], out, ov, init=str(base / "pre"), quiet=True,
                           train_experts=spec))


def test_only_the_chosen_experts_change_and_the_loss_falls(base, tmp_path):
    res = esft(base, tmp_path / "run", "top-p:0.4")
    chosen = {int(i): v for i, v in res["train_experts"].items()}
    assert sorted(chosen) == [0, 1] and all(1 <= len(v) < 8 for v in chosen.values())
    before = load_file(base / "pre" / "checkpoint" / "model.safetensors")
    after = load_file(tmp_path / "run" / "checkpoint" / "model.safetensors")
    assert before.keys() == after.keys()  # the checkpoint's format as it was
    for name, t in before.items():
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        if ".moe.experts." in name:
            moved = [e for e in range(8) if not torch.equal(after[name][e], t[e])]
            assert moved == chosen[layer], name  # every chosen expert trained, no other
        else:
            assert torch.equal(after[name], t), name  # attention, embeddings, norms, router: bit-identical
    per_expert = 3 * 32 * 32
    assert res["trainable_parameters"] == per_expert * sum(len(v) for v in chosen.values())
    opt = load_file(tmp_path / "run" / "checkpoint" / "optimizer.safetensors")
    moments = sum(v.numel() for k, v in opt.items() if not k.endswith(".step"))
    assert moments == 2 * res["trainable_parameters"]  # AdamW state only for what trains
    vals = [r["val_loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open()) if "val_loss" in r]
    pre_val = [r["val_loss"] for r in map(json.loads, (base / "pre" / "metrics.jsonl").open()) if "val_loss" in r]
    assert vals[-1] < pre_val[-1] and vals[-1] < vals[0]
    mem = res["memory_estimate"]
    full = esft(base, tmp_path / "full", None)["memory_estimate"]
    assert mem["states"] < full["states"]


def test_a_resumed_run_continues_exactly_with_its_experts(base, tmp_path):
    flat = {"train.lr_schedule": "constant", "train.warmup_steps": 0}  # the same lr whatever max_steps says
    whole = esft(base, tmp_path / "whole", "0:1,5;1:2", **flat)
    esft(base, tmp_path / "part", "0:1,5;1:2", **flat, **{"train.max_steps": 6})
    resumed = train(TrainArgs(None, [str(base / "t.txt")], tmp_path / "part", {"train.max_steps": 12},
                              resume=True, quiet=True))
    assert resumed["train_experts"] == whole["train_experts"] == {"0": [1, 5], "1": [2]}
    assert resumed["final_loss"] == whole["final_loss"] and resumed["val_loss"] == whole["val_loss"]
    a = load_file(tmp_path / "whole" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "part" / "checkpoint" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "part" / "checkpoint" / "config.json").read_text())
    assert cfg["train_experts"] == {"0": [1, 5], "1": [2]}


BAD = [
    (("--train-experts", "top-p:0"), "top-p:P needs P in (0, 1]"),
    (("--train-experts", "top-p:x"), "top-p:P needs P in (0, 1]"),
    (("--train-experts", "5:0"), "layer 5 is not an MoE layer (MoE layers: 0, 1)"),
    (("--train-experts", "0:8"), "layer 0: experts are 0 to 7, got 8"),
    (("--train-experts", "0:1;0:2"), "layer 0 is named twice"),
    (("--train-experts", "zero"), "expected top-p:P or LAYER:E,E;LAYER:E"),
    (("--train-experts", "0:1", "--nproc", "2", "--fsdp"), "--train-experts: not with --fsdp"),
]


@pytest.mark.parametrize("flags,message", BAD, ids=[m[:28] for _, m in BAD])
def test_bad_specs_are_one_line(base, tmp_path, cli, flags, message):
    r = cli("train", "--init", base / "pre", base / "t.txt", "-o", tmp_path / "o", *flags)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o" / "checkpoint").exists()


def test_train_experts_needs_init_and_is_not_changed_on_resume(base, tmp_path, cli):
    r = cli("train", base / "tiny.yaml", base / "t.txt", "-o", tmp_path / "o", "--train-experts", "0:1")
    assert r.returncode == 2 and "start from it with --init" in r.stderr
    r = cli("train", "-o", base / "pre", "--resume", "--train-experts", "0:1")
    assert r.returncode == 2 and "a resumed run trains the experts it chose" in r.stderr
    assert Path(base / "pre" / "checkpoint").is_dir()
