"""moe train --init CKPT --lora R: adapters on a frozen base. The base stays bit-identical, the run's checkpoint
holds the adapters alone and resumes exactly, eval / generate / export read the run with its adapters merged, the
memory estimate counts the adapters, and bad values are refused in one line."""

import json

import pytest
import torch
from safetensors.torch import load_file

from moecli.formats.checkpoint import load_checkpoint
from moecli.model.lora import ADAPTER_FILE
from moecli.training.setup import TrainArgs
from moecli.training.trainer import Trainer, train

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}.\n" for i in range(500))


def pretrained(d, moe: dict):
    import yaml

    (d / "t.txt").write_text(TEXT)
    (d / "tiny.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "model": {"n_layers": 3, "d_model": 32, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64,
                                  "context": 64},
        "moe": {"num_experts": 4, "top_k": 2, "expert_ffn": 24, **moe},
        "train": {"batch_size": 4, "seq_len": 32, "max_steps": 4, "warmup_steps": 1, "eval_interval": 4,
                  "eval_batches": 1}}))
    train(TrainArgs(str(d / "tiny.yaml"), [str(d / "t.txt")], d / "pre", {}, quiet=True))
    return d


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny MoE with shared experts and a dense first layer (every target present), pretrained a few steps."""
    return pretrained(tmp_path_factory.mktemp("lora"), {"num_shared_experts": 1, "first_k_dense": 1})


@pytest.fixture(scope="module")
def mixtral_like(tmp_path_factory):
    """A tiny Mixtral-shaped MoE (what export writes as Hugging Face Mixtral), pretrained a few steps."""
    return pretrained(tmp_path_factory.mktemp("lora-mixtral"), {})


def lora_args(base, out, steps=10, **over):
    ov = {"train.max_steps": steps, "train.lr": 1e-2, "train.eval_interval": 5, "train.eval_batches": 2,
          "train.lr_schedule": "constant", "train.warmup_steps": 0, **over}
    return TrainArgs(None, [str(base / "t.txt")], out, ov, init=str(base / "pre"), quiet=True, lora=4)


def test_the_base_stays_and_the_adapters_learn(base, tmp_path):
    trainer = Trainer(lora_args(base, tmp_path / "run"))
    res = trainer.run()
    stored = load_file(base / "pre" / "checkpoint" / "model.safetensors")
    state = trainer.model.state_dict()
    for name, t in stored.items():
        assert torch.equal(state[name], t), name  # every frozen weight bit for bit
    adapters = load_file(tmp_path / "run" / "checkpoint" / ADAPTER_FILE)
    assert adapters and all(".lora." in k for k in adapters)
    assert {k.split(".lora.")[0].split(".", 2)[-1] for k in adapters} == {
        "attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
        "feed_forward.w3", "moe.shared.w1", "moe.shared.w2", "moe.shared.w3", "moe.experts"}
    assert not (tmp_path / "run" / "checkpoint" / "model.safetensors").exists()
    assert res["trainable_parameters"] == sum(v.numel() for v in adapters.values())
    opt = load_file(tmp_path / "run" / "checkpoint" / "optimizer.safetensors")
    assert sum(v.numel() for k, v in opt.items() if not k.endswith(".step")) == 2 * res["trainable_parameters"]
    pre_val = [r["val_loss"] for r in map(json.loads, (base / "pre" / "metrics.jsonl").open()) if "val_loss" in r]
    assert res["val_loss"] < pre_val[-1]
    full = train(TrainArgs(None, [str(base / "t.txt")], tmp_path / "full", {"train.max_steps": 1},
                           init=str(base / "pre"), quiet=True))
    assert res["memory_estimate"]["states"] < full["memory_estimate"]["states"]


def test_resume_is_exact_and_the_run_reads_as_its_merged_model(mixtral_like, tmp_path, cli):
    base = mixtral_like
    whole = train(lora_args(base, tmp_path / "whole", 10))
    train(lora_args(base, tmp_path / "part", 5))
    resumed = train(TrainArgs(None, [str(base / "t.txt")], tmp_path / "part", {"train.max_steps": 10},
                              resume=True, quiet=True))
    assert resumed["final_loss"] == whole["final_loss"] and resumed["val_loss"] == whole["val_loss"]
    a = load_file(tmp_path / "whole" / "checkpoint" / ADAPTER_FILE)
    b = load_file(tmp_path / "part" / "checkpoint" / ADAPTER_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # eval, the merged model and the merged export agree
    run = tmp_path / "whole"
    ev = cli("eval", run, base / "t.txt", "--seq-len", "32", "--max-windows", "8", "--json")
    assert ev.returncode == 0, ev.stderr
    out = cli("export", run, "-o", tmp_path / "hf", "--json")
    assert out.returncode == 0, out.stderr
    ev2 = cli("eval", tmp_path / "hf", base / "t.txt", "--seq-len", "32", "--max-windows", "8", "--json")
    assert json.loads(ev2.stdout)["loss"] == pytest.approx(json.loads(ev.stdout)["loss"], rel=1e-5)
    merged, _ = load_checkpoint(run)
    pre, _ = load_checkpoint(base / "pre")
    x = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(merged(x).logits_BSV, pre(x).logits_BSV)  # the adapters are in
    g = cli("generate", run, "-p", "Line", "-n", "8", "-t", "0", "--json")
    assert g.returncode == 0, g.stderr


BAD = [
    (("--lora", "0"), "--lora: the rank must be >= 1, got 0"),
    (("--lora", "40"), "--lora 40: above the width of"),
    (("--lora", "4", "--lora-targets", "attention,mlp"), "--lora-targets: each of attention, experts, shared, dense, "
                                                         "router, comma-separated; got mlp"),
    (("--lora", "4", "--lora-alpha", "0"), "--lora-alpha: must be > 0"),
    (("--lora", "4", "--base-dtype", "bfloat16"), "--base-dtype bfloat16: needs --precision bf16-mixed"),
    (("--lora", "4", "--base-dtype", "int8"), "--base-dtype: one of float32, bfloat16, auto"),
    (("--lora", "4", "--train-experts", "1:0"), "--lora with --train-experts: not yet"),
]


@pytest.mark.parametrize("flags,message", BAD, ids=[m[:26] for _, m in BAD])
def test_bad_lora_values_are_one_line(base, tmp_path, cli, flags, message):
    r = cli("train", "--init", base / "pre", base / "t.txt", "-o", tmp_path / "o", *flags)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o" / "checkpoint").exists()


def test_lora_needs_init(base, tmp_path, cli):
    r = cli("train", base / "tiny.yaml", base / "t.txt", "-o", tmp_path / "o", "--lora", "4")
    assert r.returncode == 2 and "start from it with --init" in r.stderr


def test_lora_under_two_processes_matches_one(base, tmp_path, cli):
    """--lora with --nproc 2 (DDP over gloo): the same losses as one process, and adapters alone in the checkpoint."""
    runs = {}
    for n in ("1", "2"):
        out = tmp_path / f"n{n}"
        r = cli("train", "--init", base / "pre", base / "t.txt", "-o", out, "--lora", "4", "--max-steps", "4",
                "--lr", "1e-2", "--nproc", n, "-q")
        assert r.returncode == 0, r.stderr
        runs[n] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert sorted(p.name for p in (out / "checkpoint").iterdir()) == [
            ADAPTER_FILE, "config.json", "optimizer.safetensors", "train_state.json"]
    assert runs["2"] == pytest.approx(runs["1"], rel=1e-5)
