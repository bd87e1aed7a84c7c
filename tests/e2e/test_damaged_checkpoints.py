"""Damaged or hand-edited checkpoints: one line naming the file and what is wrong (exit 2), never a traceback,
a NaN loss or a kernel reading past a tensor; and nothing of the run is changed by the refused command."""

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moecli.formats.checkpoint import load_checkpoint
from moecli.errors import UserError
from moecli.training.setup import TrainArgs
from moecli.training.trainer import train

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}.\n" for i in range(300))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-step run of a tiny recipe (a checkpoint with optimizer and train_state.json)."""
    import yaml

    d = tmp_path_factory.mktemp("run")
    (d / "corpus.txt").write_text(TEXT)
    recipe = d / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tiny", "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64,
                                  "context": 64},
        "moe": {"num_experts": 4, "top_k": 2, "expert_ffn": 32},
        "train": {"batch_size": 4, "seq_len": 32, "max_steps": 3, "warmup_steps": 1, "eval_interval": 3,
                  "eval_batches": 1}}))
    train(TrainArgs(str(recipe), [str(d / "corpus.txt")], d / "run", {}, quiet=True))
    return d / "run"


def damaged(run, tmp_path, edit):
    """A copy of the run with edit(checkpoint_dir) applied; returns (run copy, digest of every file in it)."""
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    edit(out / "checkpoint")
    return out, digest(out)


def digest(d):
    files = (p for p in sorted(d.rglob("*")) if p.is_file())
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def edit_json(name, change):
    def edit(ckpt):
        obj = json.loads((ckpt / name).read_text())
        (ckpt / name).write_text(json.dumps(change(obj)))
    return edit


def edit_tensors(name, change):
    def edit(ckpt):
        sd = load_file(ckpt / name)
        change(sd)
        save_file({k: v.contiguous() for k, v in sd.items()}, ckpt / name)
    return edit


def _first(sd, part):
    return next(k for k in sd if part in k)


def _nan(sd):
    k = _first(sd, "w1_EDF")
    sd[k][0, 0, :3] = float("nan")


def _int(sd):
    k = _first(sd, "w2_EFD")
    sd[k] = sd[k].to(torch.int32)


def _short_moment(sd):
    sd["0.exp_avg_sq"] = sd["0.exp_avg_sq"].flatten()[:5]


def _alien_key(sd):
    sd["999.exp_avg"] = torch.zeros(3)


RESUME = [
    (edit_json("config.json", lambda c: {**c, "version": 2}),
     "config.json: version: 2; this moecli reads checkpoint format version 1"),
    (edit_json("train_state.json", lambda ts: [1, 2]), "train_state.json: expected a JSON object, got list"),
    (edit_json("train_state.json", lambda ts: {**ts, "step": "3"}),
     "train_state.json: step: must be a whole number >= 0, got '3'"),
    (edit_json("train_state.json", lambda ts: {**ts, "tokens_seen": -1}), "train_state.json: tokens_seen: must be"),
    (edit_json("train_state.json", lambda ts: {**ts, "param_groups": ts["param_groups"][:1]}),
     "train_state.json: param_groups: do not fit this model's optimizer"),
    (edit_json("train_state.json", lambda ts: {**ts, "data_weights": [1, 0]}),
     "train_state.json: data_weights: must be a list of positive numbers, got [1, 0]"),
    (edit_json("train_state.json", lambda ts: {**ts, "early_stop": {"passes": "x"}}), "train_state.json: early_stop:"),
    (edit_tensors("optimizer.safetensors", _short_moment),
     "optimizer.safetensors: 0.exp_avg_sq has shape (5,); tok_embeddings.weight needs (256, 32)"),
    (edit_tensors("optimizer.safetensors", _alien_key), "optimizer.safetensors: 999.exp_avg: not a tensor of this"),
    (edit_tensors("model.safetensors", _nan),
     "model.safetensors: layers.0.moe.experts.w1_EDF holds 3 NaN or inf values"),
]


@pytest.mark.parametrize("edit,message", RESUME, ids=[m.split(": ", 1)[1][:40] for _, m in RESUME])
def test_resume_refuses_a_damaged_checkpoint_and_changes_nothing(run, tmp_path, edit, message):
    out, before = damaged(run, tmp_path, edit)
    with pytest.raises(UserError) as e:
        train(TrainArgs(None, [], out, {"train.max_steps": 5}, resume=True, quiet=True))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(out / "checkpoint") in str(e.value)
    assert digest(out) == before  # nothing of the run was touched: metrics, checkpoint, token cache


LOAD = [
    (edit_json("config.json", lambda c: {**c, "version": 2}),
     "config.json: version: 2; this moecli reads checkpoint format version 1"),
    (edit_tensors("model.safetensors", _nan), "model.safetensors: layers.0.moe.experts.w1_EDF holds 3 NaN or inf"),
    (edit_tensors("model.safetensors", _int), "model.safetensors: layers.0.moe.experts.w2_EFD has dtype int32; "
                                              "expected floating point"),
]


@pytest.mark.parametrize("edit,message", LOAD, ids=["version", "nan", "int"])
def test_loading_refuses_a_damaged_checkpoint(run, tmp_path, edit, message):
    out, _ = damaged(run, tmp_path, edit)
    with pytest.raises(UserError) as e:
        load_checkpoint(out)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_undamaged_run_loads_and_resumes(run, tmp_path):
    """The checks pass what training itself wrote (the fixture's run, copied and resumed)."""
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    load_checkpoint(out)
    summary = train(TrainArgs(None, [], out, {"train.max_steps": 4}, resume=True, quiet=True))
    assert summary["start_step"] == 3 and summary["steps"] == 4


@pytest.mark.parametrize("command", [["eval"], ["generate", "-p", "hi", "-n", "2"], ["inspect-routing"]])
def test_cli_exit_2_one_line_on_nan_weights(run, tmp_path, cli, command):
    out, _ = damaged(run, tmp_path, edit_tensors("model.safetensors", _nan))
    res = cli(command[0], out, *command[1:])
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        f"error: {out / 'checkpoint' / 'model.safetensors'}: layers.0.moe.experts.w1_EDF holds 3 NaN or inf values "
        f"(of {4 * 32 * 32})"]


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loaded_model_is_the_saved_one(tmp_path, tie, dtype):
    """load_checkpoint builds the model on the meta device and takes the file's tensors: nothing is left on
    meta, tied embeddings stay one tensor, and the logits are the saved model's (cast to dtype)."""
    from moecli.formats.native import save_checkpoint
    from moecli.config import apply_overrides, load_recipe
    from moecli.model.transformer import build_model

    recipe = apply_overrides(load_recipe("deepseek-v3"), {"model.tie_embeddings": tie, "model.n_layers": 2})
    saved = build_model(recipe, seed=3).eval()
    saved.layers[1].moe.router.expert_bias.copy_(torch.linspace(-1, 1, recipe.moe.num_experts))
    (tmp_path / "ckpt").mkdir()
    save_checkpoint(saved, tmp_path / "ckpt")
    model, _ = load_checkpoint(tmp_path / "ckpt", dtype)
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.device.type == "cpu" and t.dtype == dtype for t in tensors)
    assert (model.output.weight is model.tok_embeddings.weight) == tie
    assert torch.equal(model.layers[1].moe.router.expert_bias, saved.layers[1].moe.router.expert_bias.to(dtype))
    x = torch.randint(0, recipe.model.vocab_size, (2, 16))
    with torch.no_grad():
        got = model(x).logits_BSV
        want = saved.to(dtype)(x).logits_BSV
    assert torch.equal(got, want)


def test_hf_config_sizes_missing_or_malformed_name_the_key():
    from moecli.formats.hf import recipe_from_hf

    base = {"model_type": "llama", "vocab_size": 64, "num_hidden_layers": 1, "hidden_size": 32,
            "num_attention_heads": 2, "intermediate_size": 64}
    assert recipe_from_hf(base).model.n_heads == 2
    for change, message in [({"num_attention_heads": None}, "num_attention_heads: missing"),
                            ({"hidden_size": "32"}, "hidden_size: must be a whole number >= 1, got '32'"),
                            ({"num_hidden_layers": 0}, "num_hidden_layers: must be a whole number >= 1, got 0"),
                            ({"model_type": "mixtral", "num_local_experts": 4}, "num_experts_per_tok: missing")]:
        cfg = {k: v for k, v in {**base, **change}.items() if v is not None}
        with pytest.raises(UserError, match="cfg.json: " + message):
            recipe_from_hf(cfg, "cfg.json")


def test_upcycle_source_with_tensors_that_do_not_fit_its_config(tmp_path):
    """Refused before anything is written, in the source's own tensor names (was an AssertionError, exit 1)."""
    from moecli.commands.build import build
    from moecli.commands.export import export
    from moecli.commands.upcycle import UpcycleOptions, upcycle

    dense = tmp_path / "dense"
    build("dense", dense, {"model.n_layers": 1})
    export(str(dense), tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 999}))
    sd = load_file(dense / "model.safetensors")
    save_file({**sd, "layers.0.attention.wq.weight": sd["layers.0.attention.wq.weight"][:5].clone()},
              dense / "model.safetensors")
    for source, message in [(tmp_path / "hf", "model.layers.0.mlp.gate_proj.weight has shape (512, 128), "
                                              "config.json says (999, 128)"),
                            (dense, "layers.0.attention.wq.weight has shape (5, 128), config.json says (128, 128)")]:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            upcycle(str(source), tmp_path / "out", UpcycleOptions(num_experts=4, top_k=2))
        assert not (tmp_path / "out").exists()
