"""moe train / eval / generate: exact resume (also after kill -9), NaN stop, data inputs, CLI errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moecli.training.setup import TrainArgs
from support.paths import ROOT
from moecli.training.trainer import train

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}.\n" for i in range(600))


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT)
    return p


def losses(run_dir):
    return [(r["step"], r["loss"], r.get("val_loss")) for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").open())]


def test_resume_matches_uninterrupted(tmp_path, corpus, tiny_recipe):
    recipe = str(tiny_recipe(moe={"router_jitter": 0.05, "router_noise": 0.1}, balance={"aux_loss_coef": 0.01}))
    full = tmp_path / "full"
    train(TrainArgs(recipe, [str(corpus)], full, {"train.max_steps": 8}, quiet=True))
    part = tmp_path / "part"
    train(TrainArgs(recipe, [str(corpus)], part, {"train.max_steps": 8, "train.ckpt_interval": 3}, quiet=True))
    # pretend the run stopped after step 3: throw away the later checkpoint and metrics by re-running to 3
    part2 = tmp_path / "part2"
    train(TrainArgs(recipe, [str(corpus)], part2, {"train.max_steps": 3}, quiet=True))
    train(TrainArgs(None, [str(corpus)], part2, {"train.max_steps": 8}, resume=True, quiet=True))
    assert losses(part2) == losses(full)
    assert len(losses(full)) == 8
    from safetensors.torch import load_file
    a = load_file(full / "checkpoint" / "model.safetensors")
    b = load_file(part2 / "checkpoint" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_9_mid_run_then_resume(tmp_path, corpus, tiny_recipe, cli):
    recipe = tiny_recipe(moe={"random_routing": True}, train={"max_steps": 60, "ckpt_interval": 4, "eval_interval": 20})
    ref = tmp_path / "ref"
    res = cli("train", recipe, corpus, "-o", ref, "-q")
    assert res.returncode == 0, res.stderr
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "moecli.cli", "train", str(recipe), str(corpus), "-o", str(run), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline:
        state = run / "checkpoint" / "train_state.json"
        if state.exists() and json.loads(state.read_text())["step"] >= 8:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads((run / "checkpoint" / "train_state.json").read_text())["step"] if (run / "checkpoint").exists() else 0
    assert done < 60, "the run finished before it could be killed; make it longer"
    res = cli("train", "-o", run, "--resume", "-q", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["start_step"] >= 8
    assert losses(run) == losses(ref)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_the_step_it_stopped_after(tmp_path, corpus, tiny_recipe, cli, sig):
    """Ctrl-C (SIGINT) or SIGTERM mid-run: the step under way finishes and is saved (no checkpoint was due for
    another 1000 steps), the run exits 128 + the signal with one line saying where, and --resume then gives
    the uninterrupted run's losses."""
    recipe = tiny_recipe(moe={"random_routing": True}, train={"max_steps": 400, "ckpt_interval": 1000,
                                                               "eval_interval": 1000})
    run = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "moecli.cli", "train", str(recipe), str(corpus), "-o", str(run),
                             "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    deadline, metrics = time.time() + 120, run / "metrics.jsonl"
    while time.time() < deadline and (metrics.read_text().count("\n") if metrics.is_file() else 0) < 5:
        time.sleep(0.01)
    proc.send_signal(sig)
    stderr = proc.communicate(timeout=120)[1]
    done = json.loads((run / "checkpoint" / "train_state.json").read_text())["step"]
    assert proc.returncode == 128 + sig and 5 <= done < 400, (proc.returncode, stderr)
    assert stderr.strip() == (f"error: {sig.name}: stopped after step {done} of 400, saved in {run / 'checkpoint'}; "
                              f"continue with: moe train -o {run} --resume")
    assert losses(run)[-1][0] == done  # the metrics end at the saved step
    if sig == signal.SIGINT:
        assert cli("train", "-o", run, "--resume", "-q").returncode == 0
        ref = tmp_path / "ref"
        assert cli("train", recipe, corpus, "-o", ref, "-q").returncode == 0
        assert losses(run) == losses(ref)


def test_nan_stops_with_clear_error_and_keeps_last_checkpoint(tmp_path, corpus, tiny_recipe, cli):
    recipe = tiny_recipe(train={"lr": 1e30, "warmup_steps": 1, "ckpt_interval": 1, "max_steps": 20, "grad_clip": 0})
    run = tmp_path / "nan"
    res = cli("train", recipe, corpus, "-o", run, "-q")
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert "became" in line and "last good checkpoint" in line
    step = json.loads((run / "checkpoint" / "train_state.json").read_text())["step"]
    assert step >= 1
    ev = cli("eval", run, corpus, "--json")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["loss"] == pytest.approx(json.loads(ev.stdout)["loss"])  # finite number


def test_eval_generate_stdin_and_bias(tmp_path, corpus, tiny_recipe, cli):
    recipe = tiny_recipe(moe={"score_func": "sigmoid", "num_shared_experts": 1},
                         balance={"bias_update_rate": 0.01, "seq_aux_loss_coef": 0.001})
    run = tmp_path / "r"
    res = cli("train", recipe, "-", "-o", run, "--json", "-q", input=TEXT)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["final_step"] == 6 and summary["val_loss"] > 0
    from safetensors.torch import load_file
    sd = load_file(run / "checkpoint" / "model.safetensors")
    biases = [v for k, v in sd.items() if k.endswith("expert_bias")]
    assert biases and any(b.abs().sum() > 0 for b in biases), "aux-free bias was never updated"
    ev = cli("eval", run, corpus, "--json")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["loss"] > 0
    ev2 = cli("eval", run, "-", "--json", input=TEXT)
    assert json.loads(ev2.stdout)["loss"] == pytest.approx(json.loads(ev.stdout)["loss"], rel=1e-6)
    g1 = cli("generate", run, "--prompt", "Line 1", "-n", "20", "--seed", "3", "--json")
    g2 = cli("generate", run, "--prompt", "Line 1", "-n", "20", "--seed", "3", "--json")
    assert g1.returncode == 0, g1.stderr
    assert json.loads(g1.stdout) == json.loads(g2.stdout)
    assert json.loads(g1.stdout)["new_tokens"] == 20


def test_eval_defaults_to_the_runs_validation_split_and_scores_short_text(tmp_path, corpus, tiny_recipe, cli):
    run = tmp_path / "r"
    res = cli("train", tiny_recipe(), corpus, "-o", run, "--json", "-q")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    # no DATA: the split training validated on; training scored eval_batches x batch_size = 2 x 4 windows of it
    ev = cli("eval", run, "--max-windows", 8, "--json")
    assert ev.returncode == 0, ev.stderr
    out = json.loads(ev.stdout)
    assert out["loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
    assert out["windows"] == 8 and out["seq_len"] == 32 and out["data"].startswith("validation split of")
    whole = json.loads(cli("eval", run, "--json").stdout)
    assert whole["tokens"] > out["tokens"]
    # a text shorter than one window of the recipe's 32 is scored as one window of its own length
    short = cli("eval", run, "-", "--json", input="Line 1: the quick")
    assert short.returncode == 0, short.stderr
    s = json.loads(short.stdout)
    assert (s["windows"], s["seq_len"], s["tokens"]) == (1, 16, 16) and s["loss"] > 0
    # ... unless --seq-len asks for more than it has
    long = cli("eval", run, "-", "--seq-len", 32, input="Line 1: the quick")
    assert long.returncode == 2 and long.stderr.strip() == (
        "error: -: only 17 tokens; need at least 33 to score one window of --seq-len 32")
    # no DATA and no run around the checkpoint, or a token cache changed since: one line, exit 2
    import shutil
    shutil.copytree(run / "checkpoint", tmp_path / "copy")
    bare = cli("eval", tmp_path / "copy")
    assert bare.returncode == 2 and len(bare.stderr.strip().splitlines()) == 1 and "DATA" in bare.stderr
    meta = run / "data" / "tokens.json"
    meta.write_text(json.dumps(json.loads(meta.read_text()) | {"fingerprint": "0"}))
    changed = cli("eval", run)
    assert changed.returncode == 2 and "changed since the checkpoint" in changed.stderr
    assert "Traceback" not in changed.stderr


def test_val_data_is_the_validation_set_and_resumes_from_its_cache(tmp_path, corpus, tiny_recipe, cli):
    val = tmp_path / "val.txt"
    val.write_text("".join(f"Row {i}: a slow red fox walks under the busy cat.\n" for i in range(40)))
    recipe = tiny_recipe(train={"max_steps": 8, "ckpt_interval": 3})
    full = tmp_path / "full"
    res = cli("train", recipe, corpus, "--val-data", val, "-o", full, "--json", "-q")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    # byte tokenizer: all of DATA trains, the --val-data text validates
    assert (summary["train_tokens"], summary["val_tokens"]) == (len(TEXT), len(val.read_bytes()))
    assert summary["val_from"] == "--val-data"
    on_file = json.loads(cli("eval", full, val, "--max-windows", 8, "--json").stdout)  # 2 batches x 4 windows
    on_run = json.loads(cli("eval", full, "--max-windows", 8, "--json").stdout)
    assert on_file["loss"] == pytest.approx(summary["val_loss"], rel=1e-6) == on_run["loss"]
    # resumed without DATA: both token caches reused, the same losses as the uninterrupted run
    part = tmp_path / "part"
    assert cli("train", recipe, corpus, "--val-data", val, "-o", part, "--max-steps", 3, "-q").returncode == 0
    res = cli("train", "-o", part, "--resume", "--max-steps", 8, "-q")
    assert res.returncode == 0, res.stderr
    assert losses(part) == losses(full) and len(losses(full)) == 8
    for args in ((corpus,), (recipe, corpus)):  # DATA without its --val-data: another run's data
        changed = cli("train", *args, "-o", part, "--resume", "-q", "--max-steps", 9)
        assert changed.returncode == 2 and "training data changed" in changed.stderr
    both = cli("train", recipe, "-", "--val-data", "-", "-o", tmp_path / "stdin", "-q", input=TEXT)
    assert both.returncode == 2 and both.stderr.strip() == (
        "error: --val-data -: standard input is already DATA (it can be read once); give a file")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    bad = cli("train", recipe, corpus, "--val-data", short, "-o", tmp_path / "bad", "-q")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        f"error: --val-data {short}: only 9 tokens; need at least 33 for one window at seq_len 32")


def test_training_lowers_loss_and_metrics(tmp_path, corpus, tiny_recipe):
    recipe = str(tiny_recipe(moe={"capacity_factor": 1.0}, balance={"aux_loss_coef": 0.01, "z_loss_coef": 0.001}))
    run = tmp_path / "m"
    s = train(TrainArgs(recipe, [str(corpus)], run, {"train.max_steps": 40, "train.lr": 0.01}, quiet=True))
    recs = [json.loads(l) for l in (run / "metrics.jsonl").open()]
    assert recs[-1]["loss"] < recs[0]["loss"] - 1.0
    assert set(recs[0]["aux"]) == {"aux", "z"}
    assert len(recs[0]["max_vio"]) == 2
    assert 0 <= recs[0]["dropped_frac"] < 1
    assert s["val_loss"] == recs[-1]["val_loss"]


def test_bf16_mixed_precision(tmp_path, corpus, cli, tiny_recipe):
    """--precision bf16-mixed: the same numbers for the same seed, a first loss within bf16 rounding of
    fp32's (same weights, same batch), fp32 weights in the checkpoint and the setting in its recipe;
    a bad value is a one-line error naming the field."""
    from safetensors import safe_open

    recipe = tiny_recipe()
    runs = {}
    for name, precision in (("a", "bf16-mixed"), ("b", "bf16-mixed"), ("f", "fp32")):
        r = cli("train", recipe, corpus, "-o", tmp_path / name, "-q", "--max-steps", "4", "--precision", precision,
                "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["precision"] == precision
        runs[name] = losses(tmp_path / name)
    assert runs["a"] == runs["b"] and len(runs["a"]) == 4
    first_bf16, first_fp32 = runs["a"][0][1], runs["f"][0][1]
    assert first_bf16 == pytest.approx(first_fp32, rel=1e-2) and first_bf16 != first_fp32
    assert all(0 < loss < 10 for _, loss, _ in runs["a"])
    ckpt = tmp_path / "a" / "checkpoint"
    assert json.loads((ckpt / "config.json").read_text())["recipe"]["train"]["precision"] == "bf16-mixed"
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    r = cli("train", recipe, corpus, "-o", tmp_path / "bad", "--precision", "fp8")
    assert r.returncode == 2
    assert r.stderr.strip().endswith("train.precision: must be one of fp32, bf16-mixed, got 'fp8'")
    assert "\n" not in r.stderr.strip() and not (tmp_path / "bad").exists()


def test_train_input_errors(tmp_path, corpus, cli, tiny_recipe):
    r = cli("train", "mixtral", tmp_path / "missing.txt", "-o", tmp_path / "x")
    assert r.returncode == 2 and "missing.txt: no such file or directory" in r.stderr
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hi")
    r = cli("train", "mixtral", tiny, "-o", tmp_path / "y")
    assert r.returncode == 2 and "only" in r.stderr and "tokens" in r.stderr
    r = cli("train", "mixtral", corpus, "-o", tmp_path / "z", "--max-steps", "0")
    assert r.returncode == 2 and "train.max_steps: must be >= 1" in r.stderr
    r = cli("train", "-o", tmp_path / "nothing", "--resume")
    assert r.returncode == 2 and "no checkpoint to resume" in r.stderr
    recipe = tiny_recipe()
    run = tmp_path / "run"
    assert cli("train", recipe, corpus, "-o", run, "-q", "--max-steps", "2").returncode == 0
    r = cli("train", recipe, corpus, "-o", run, "-q")
    assert r.returncode == 2 and "already holds a run" in r.stderr
    r = cli("eval", tmp_path / "nope", corpus)
    assert r.returncode == 2 and "no such checkpoint" in r.stderr


def test_default_corpus_is_embedded(tmp_path):
    from moecli.data.corpus import default_corpus_files
    files = default_corpus_files(200_000)
    assert files and all(f.suffix == ".py" for f in files)


def test_hf_tokenizer_json(tmp_path, corpus, tiny_recipe, cli):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([TEXT, "The quick brown fox, the lazy dog; quick quick brown."],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    assert tok.get_vocab_size() > 256
    run = tmp_path / "run"
    r = cli("train", tiny_recipe(), corpus, "-o", run, "--tokenizer", path, "-q", "--json")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((run / "checkpoint" / "config.json").read_text())
    assert cfg["tokenizer"]["type"] == "hf" and cfg["recipe"]["model"]["vocab_size"] == tok.get_vocab_size()
    assert (run / "checkpoint" / "tokenizer.json").is_file()
    ev = cli("eval", run, corpus, "--json")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["tokens"] < len(TEXT) / 2  # BPE tokens, not bytes
    g = cli("generate", run, "--prompt", "Line 3:", "-n", "5", "--json")
    assert g.returncode == 0 and json.loads(g.stdout)["new_tokens"] == 5
    printed = cli("generate", run, "--prompt", "Line 3:", "-n", "5")  # streamed piece by piece: the same text
    assert printed.stdout == "Line 3:" + json.loads(g.stdout)["completion"] + "\n"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = cli("train", tiny_recipe(), corpus, "-o", tmp_path / "r2", "--tokenizer", bad)
    assert r.returncode == 2 and "bad.json: not a readable tokenizer.json" in r.stderr


def test_init_continues_an_upcycled_model(tmp_path, corpus, tiny_recipe, cli):
    """Sparse upcycling end to end: train dense, upcycle, train the MoE from the upcycled weights."""
    dense = tiny_recipe(name="d", moe={"num_experts": 0, "top_k": 0},
                        train={"max_steps": 30, "eval_interval": 30, "ckpt_interval": 30})
    assert cli("train", dense, corpus, "-o", tmp_path / "dense", "-q").returncode == 0
    r = cli("upcycle", tmp_path / "dense", "-o", tmp_path / "up", "-e", "4", "-k", "2", "--json")
    assert r.returncode == 0, r.stderr
    runs = {}
    for name, init in (("from_up", tmp_path / "up"), ("from_dense", tmp_path / "dense")):
        r = cli("train", "--init", init, corpus, "-o", tmp_path / name, "--max-steps", "3", "-q", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["init"].startswith(str(init))
        runs[name] = losses(tmp_path / name)
    fresh = tiny_recipe(name="f", train={"max_steps": 3, "eval_interval": 3, "ckpt_interval": 3})
    assert cli("train", fresh, corpus, "-o", tmp_path / "fresh", "-q").returncode == 0
    # the first step's loss is taken before any update: the upcycled MoE computes the dense function
    assert runs["from_up"][0][1] == pytest.approx(runs["from_dense"][0][1], rel=1e-5)
    assert runs["from_up"][0][1] < losses(tmp_path / "fresh")[0][1] - 1.0  # the trained weights were loaded
    cfg = json.loads((tmp_path / "from_up" / "checkpoint" / "config.json").read_text())
    assert cfg["recipe"]["moe"]["num_experts"] == 4
    r = cli("train", "-o", tmp_path / "from_up", "--resume", "--max-steps", "4", "-q")  # an ordinary run now
    assert r.returncode == 0, r.stderr
    assert len(losses(tmp_path / "from_up")) == 4


def test_init_errors(tmp_path, corpus, tiny_recipe, cli):
    ckpt = tmp_path / "ckpt"
    assert cli("build", tiny_recipe(), "-o", ckpt).returncode == 0
    cases = [
        (["--init", tmp_path / "nope", corpus], "nope"),
        (["--init", ckpt, corpus, "--resume"], "--init starts a new run"),
        (["--init", ckpt, corpus, "--tokenizer", "x.json"], "--tokenizer: with --init"),
        (["--init", ckpt, corpus, "--set", "model.d_model=64"], "has shape"),
    ]
    for args, message in cases:
        r = cli("train", *args, "-o", tmp_path / "out", "--max-steps", "1", "-q")
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1


def test_training_flags_dead_experts_and_collapse(tmp_path, corpus, cli):
    """A router of zeros ties every score: top-2 of 4 then always picks the same two experts (collapse, 2 dead)."""
    from moecli.formats.native import save_checkpoint
    from moecli.config import recipe_from_dict
    from moecli.model.transformer import build_model

    recipe = recipe_from_dict({"name": "z", "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "n_kv_heads": 1,
                                                      "ffn_dim": 64, "context": 64},
                               "moe": {"num_experts": 4, "top_k": 2, "expert_ffn": 32},
                               "train": {"batch_size": 4, "seq_len": 32, "warmup_steps": 0}})
    model = build_model(recipe, seed=0)
    with torch.no_grad():
        for _, layer in model.moe_layers:
            layer.router.gate.weight.zero_()
    (tmp_path / "zero").mkdir()
    save_checkpoint(model, tmp_path / "zero")
    # lr 1e-12 keeps the router's scores tied in float32 for these few steps
    r = cli("train", "--init", tmp_path / "zero", corpus, "-o", tmp_path / "run", "--max-steps", "4",
            "--eval-interval", "2", "--lr", "1e-12", "--json")
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, r.stderr  # one per layer: the problem did not change at step 4
    assert all("routing collapsed" in w and "over the last 2 steps" in w for w in warnings)
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [("routing" in rec) for rec in recs] == [False, True, False, True]
    flagged = recs[-1]["routing"]["flagged"]
    assert set(flagged) == {"0", "1"}  # which two experts win the tie is up to torch.topk
    assert all(f["status"] == "collapsed" and len(f["dead"]) == 2 for f in flagged.values())
    summary = json.loads(r.stdout)["routing"]
    assert summary["0"] == {"status": "collapsed", "max_vio": 1.0, "dead": flagged["0"]["dead"]}
    # each expert's share of the window's assignments: half each for the two winners, none for the dead
    for layer, f in flagged.items():
        share = recs[-1]["routing"]["share"][layer]
        assert sorted(share) == [0.0, 0.0, 0.5, 0.5] and [e for e, v in enumerate(share) if v == 0] == f["dead"]


def test_grad_accum_gives_the_same_step(tmp_path, corpus, tiny_recipe):
    """4 micro-batches of 2 = one batch of 8: same losses and weights (balance terms are per micro-batch, so off)."""
    runs = {}
    for accum in (1, 4):
        recipe = tiny_recipe(name=f"a{accum}", train={"batch_size": 8, "grad_accum": accum, "max_steps": 3,
                                                      "eval_interval": 3, "ckpt_interval": 3},
                             balance={"aux_loss_coef": 0.0})
        out = tmp_path / f"a{accum}"
        train(TrainArgs(str(recipe), [str(corpus)], out, quiet=True))
        runs[accum] = losses(out)
        runs[f"gnorm{accum}"] = [json.loads(line)["grad_norm"] for line in (out / "metrics.jsonl").open()]
    for (s1, l1, v1), (s4, l4, v4) in zip(runs[1], runs[4]):
        assert s1 == s4 and l4 == pytest.approx(l1, rel=1e-5)
    assert runs["gnorm4"] == pytest.approx(runs["gnorm1"], rel=1e-5)  # the gradient itself, before clipping
    assert runs[4][-1][2] == pytest.approx(runs[1][-1][2], rel=1e-5)


def test_grad_accum_must_divide_the_batch(tmp_path, corpus, tiny_recipe, cli):
    r = cli("train", tiny_recipe(train={"batch_size": 6}), corpus, "-o", tmp_path / "x", "--grad-accum", "4")
    assert r.returncode == 2 and "train.grad_accum: must divide batch_size (6), got 4" in r.stderr
    r = cli("train", tiny_recipe(train={"batch_size": 6}), corpus, "-o", tmp_path / "y", "--grad-accum", "2",
            "--nproc", "2")  # 6 sequences: 3 per process, not 2 micro-batches of equal size
    assert r.returncode == 2 and "by --nproc (2) x train.grad_accum (2)" in r.stderr


def test_import_sets_mkl_reproducibility_keeping_the_users_values():
    """moecli asks MKL for a fixed thread count and alignment-independent rounding (moecli/__init__.py),
    before torch loads it; values the user set are kept."""
    code = "import moecli, os; print(os.environ['MKL_DYNAMIC'], os.environ['MKL_CBWR'])"
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_DYNAMIC", "MKL_CBWR")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["FALSE", "AUTO,STRICT"]
    env |= {"MKL_DYNAMIC": "TRUE", "MKL_CBWR": "COMPATIBLE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["TRUE", "COMPATIBLE"]


def test_info_reads_headers_only_and_reports_the_run(tmp_path, corpus, tiny_recipe, cli, monkeypatch):
    """`moe info RUN`: parameter counts from the config on the meta device, weights from the safetensors header
    (no tensor data read), the last loss and val_loss logged up to the checkpoint's step."""
    import safetensors.torch
    from safetensors.torch import load_file, save_file

    from moecli.formats import st_stream
    from moecli.formats.checkpoint import load_checkpoint
    from moecli.commands.info import info
    from moecli.model.params import parameter_report

    run = tmp_path / "run"
    assert cli("train", tiny_recipe(), corpus, "-o", run, "-q").returncode == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    with (run / "metrics.jsonl").open("a") as f:  # a step past the checkpoint, as a killed run leaves behind
        f.write(json.dumps({"step": 7, "loss": 99.0, "val_loss": 99.0}) + "\n{cut sho")

    def no_reads(*a, **k):
        raise AssertionError("tensor data read")

    monkeypatch.setattr(safetensors.torch, "load_file", no_reads)
    monkeypatch.setattr(st_stream.LazyTensors, "get", no_reads)
    res = info(str(run))
    monkeypatch.undo()
    assert res["step"] == 6 and res["loss"] == {"step": 6, "value": rows[-1]["loss"]}
    assert res["routing"] == {"step": 6, "value": [r["routing"] for r in rows if "routing" in r][-1]}
    assert res["val_loss"] == {"step": 6, "value": [r["val_loss"] for r in rows if "val_loss" in r][-1]}
    st = run / "checkpoint" / "model.safetensors"
    sd = load_file(st)
    assert res["weights"] == {"files": 1, "bytes": st.stat().st_size, "tensors": len(sd),
                              "dtypes": {"float32": sum(t.numel() for t in sd.values())}}
    assert res["params"] == parameter_report(load_checkpoint(run)[0])
    mode = (run / "checkpoint" / "config.json").stat().st_mode  # not safetensors' own 0600
    assert {f.stat().st_mode for f in (run / "checkpoint").glob("*.safetensors")} == {mode}
    sd["norm.weight"] = sd["norm.weight"][:3].clone()  # a tensor that does not fit the config: as loading says
    save_file(sd, str(st))
    r = cli("info", run)
    assert r.returncode == 2 and r.stderr.strip().endswith("norm.weight has shape (3,), config says (32,)")


def test_eval_per_file(tmp_path, tiny_recipe, cli):
    """--per-file: each source scored on its own equals evaluating it alone; the overall loss is unchanged;
    stdin is one of the sources; a source too short for --seq-len is named."""
    from moecli.commands.evaluate import evaluate

    ckpt = tmp_path / "ckpt"
    assert cli("build", tiny_recipe(), "-o", ckpt).returncode == 0
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT[:3000])
    b.write_text("Quite different text, with other words and Ünïcode. " * 40)
    both = evaluate(str(ckpt), [str(a), str(b)], None, 4, None, per_file=True)
    assert {k: v for k, v in both.items() if k != "files"} == evaluate(str(ckpt), [str(a), str(b)], None, 4, None)
    alone = [evaluate(str(ckpt), [str(p)], None, 4, None) for p in (a, b)]
    assert [f["data"] for f in both["files"]] == [str(a), str(b)]
    for got, want in zip(both["files"], alone):
        assert got == {k: v for k, v in want.items() if k not in ("checkpoint", "dtype", "device")}
    assert both["files"][0]["loss"] != both["files"][1]["loss"]
    r = cli("eval", ckpt, a, "-", "--per-file", "--json", input=b.read_text())
    assert r.returncode == 0, r.stderr
    assert [f["loss"] for f in json.loads(r.stdout)["files"]] == pytest.approx([f["loss"] for f in alone], rel=1e-6)
    (tmp_path / "short.txt").write_text("tiny")
    r = cli("eval", ckpt, a, tmp_path / "short.txt", "--per-file", "--seq-len", "16")
    assert r.returncode == 2 and r.stderr.strip().endswith("short.txt: only 4 tokens; need at least 17 to score one "
                                                           "window of --seq-len 16")
    r = cli("eval", ckpt, a, b, "--per-file")  # the table
    assert r.returncode == 0 and "per file" in r.stdout and "b.txt" in r.stdout


def test_lr_schedules(tmp_path, corpus, tiny_recipe, cli):
    """train.lr_schedule after a 10-step warmup to lr 1, min_lr_ratio 0.1, 110 steps: cosine, linear, wsd (the
    last 20% linear), constant; wsd's steps before its decay do not depend on max_steps; the run logs them."""
    from moecli.config import TrainConfig
    from moecli.training.optim import lr_at

    def lrs(schedule, steps, max_steps=110):
        t = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=max_steps, lr_schedule=schedule)
        t.validate()
        return [lr_at(s, t) for s in steps]

    assert lrs("cosine", [0, 9, 10, 60]) == pytest.approx([0.1, 1.0, 1.0, 0.55])
    assert lrs("linear", [10, 60, 85]) == pytest.approx([1.0, 0.55, 0.325])
    assert lrs("wsd", [10, 90, 100, 109]) == pytest.approx([1.0, 1.0, 0.55, 0.145])
    assert lrs("constant", [5, 10, 109]) == pytest.approx([0.6, 1.0, 1.0])
    assert lrs("wsd", range(91)) == lrs("wsd", range(91), max_steps=1000)
    run = tmp_path / "wsd"
    r = cli("train", tiny_recipe(), corpus, "-o", run, "-q", "--lr-schedule", "wsd", "--set", "train.decay_fraction=0.5")
    assert r.returncode == 0, r.stderr
    t = TrainConfig(**{**json.loads((run / "checkpoint" / "config.json").read_text())["recipe"]["train"]})
    assert (t.lr_schedule, t.decay_fraction) == ("wsd", 0.5)
    logged = [row["lr"] for row in map(json.loads, (run / "metrics.jsonl").open())]
    assert logged == pytest.approx([lr_at(s, t) for s in range(t.max_steps)])
    # extended before its decay began: a 6-step wsd run resumed to 12 steps is the 12-step run
    recipe = str(tiny_recipe(train={"lr_schedule": "wsd", "decay_fraction": 0.2}))
    train(TrainArgs(recipe, [str(corpus)], tmp_path / "long", {"train.max_steps": 12}, quiet=True))
    train(TrainArgs(recipe, [str(corpus)], tmp_path / "short", {"train.max_steps": 6}, quiet=True))
    train(TrainArgs(None, [str(corpus)], tmp_path / "short", {"train.max_steps": 12}, resume=True, quiet=True))
    assert losses(tmp_path / "short") == losses(tmp_path / "long")
    r = cli("train", tiny_recipe(), corpus, "-o", tmp_path / "bad", "--lr-schedule", "step")
    assert r.returncode == 2 and r.stderr.strip().endswith(
        "train.lr_schedule: must be one of cosine, linear, wsd, constant, got 'step'")


def test_keep_best(tmp_path, corpus, tiny_recipe, cli):
    """--keep-best: OUT/best holds the model at the lowest logged val_loss (its step and loss in config.json;
    scoring it on the validation split gives that loss); a resumed run keeps the same best; --force drops it."""
    recipe = tiny_recipe(train={"max_steps": 9, "lr": 0.03, "lr_schedule": "constant"})  # 6 steps, then 9: the same
    run = tmp_path / "run"
    r = cli("train", recipe, corpus, "-o", run, "-q", "--json", "--keep-best")
    assert r.returncode == 0, r.stderr
    rows = [row for row in map(json.loads, (run / "metrics.jsonl").open()) if "val_loss" in row]
    assert [row["step"] for row in rows] == [3, 6, 9]
    best = min(rows, key=lambda row: row["val_loss"])
    cfg = json.loads((run / "best" / "config.json").read_text())
    assert (cfg["step"], cfg["val_loss"]) == (best["step"], best["val_loss"])
    assert json.loads(r.stdout)["best"] == {"checkpoint": str(run / "best"), "val_loss": best["val_loss"]}
    assert [row["step"] for row in rows if row.get("best")][-1] == best["step"]
    t = cfg["recipe"]["train"]
    ev = cli("eval", run / "best", "--json", "--max-windows", t["eval_batches"] * t["batch_size"],
             "--batch-size", t["batch_size"])
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["loss"] == pytest.approx(best["val_loss"], rel=1e-6)
    part = tmp_path / "part"
    assert cli("train", recipe, corpus, "-o", part, "-q", "--keep-best", "--max-steps", "6").returncode == 0
    assert cli("train", "-o", part, "-q", "--resume", "--max-steps", "9").returncode == 0
    assert json.loads((part / "best" / "config.json").read_text())["val_loss"] == best["val_loss"]
    assert cli("train", recipe, corpus, "-o", part, "-q", "--force").returncode == 0
    assert not (part / "best").exists()


def test_keep_best_keeps_an_earlier_model(tmp_path, corpus, tiny_recipe, monkeypatch):
    """Validation losses 3.0, 2.0, 2.5 at steps 3, 6, 9: OUT/best is the model of step 6 (the weights a
    6-step run ends with) and stays so after step 9."""
    from safetensors.torch import load_file

    import moecli.training.validation as train_mod

    recipe = str(tiny_recipe(train={"max_steps": 9, "lr_schedule": "constant"}))
    vals = iter([3.0, 2.0, 2.5])
    monkeypatch.setattr(train_mod, "evaluate_loss", lambda *a, **k: (next(vals), 1))
    res = train(TrainArgs(recipe, [str(corpus)], tmp_path / "run", {"train.keep_best": True}, quiet=True))
    monkeypatch.undo()
    assert res["best"]["val_loss"] == 2.0
    cfg = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert (cfg["step"], cfg["val_loss"]) == (6, 2.0)
    train(TrainArgs(recipe, [str(corpus)], tmp_path / "six", {"train.max_steps": 6}, quiet=True))
    best = load_file(tmp_path / "run" / "best" / "model.safetensors")
    six = load_file(tmp_path / "six" / "checkpoint" / "model.safetensors")
    last = load_file(tmp_path / "run" / "checkpoint" / "model.safetensors")
    assert best.keys() == six.keys() and all(torch.equal(best[k], six[k]) for k in best)
    assert not all(torch.equal(best[k], last[k]) for k in best)


def test_patience_stops_early_and_resume_counts_on(tmp_path, corpus, tiny_recipe, monkeypatch, cli):
    """train.patience 3, validation losses 3.0, 2.0, 2.5, 2.0, 2.2 at steps 3..15: no pass lower than 2.0 (step 6)
    in the 3 after it, so the run stops at step 15 with a checkpoint there; --resume carries the count, so one
    more pass without a lower loss (2.1, step 18) stops it again; a lower one (1.5) starts the count anew, and a
    count that reaches the patience at max_steps is a normal end."""
    import moecli.training.validation as train_mod
    from moecli.commands.info import last_metrics

    recipe = str(tiny_recipe(train={"max_steps": 30, "lr_schedule": "constant"}))
    run = tmp_path / "run"
    vals = iter([3.0, 2.0, 2.5, 2.0, 2.2])
    monkeypatch.setattr(train_mod, "evaluate_loss", lambda *a, **k: (next(vals), 1))
    res = train(TrainArgs(recipe, [str(corpus)], run, {"train.patience": 3}, quiet=True))
    stop = {"lowest_val_loss": 2.0, "lowest_step": 6, "passes": 3}
    assert res["final_step"] == 15 and res["stopped_early"] == stop and res["val_loss"] == 2.2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert rows[-1]["step"] == 15 and rows[-1]["early_stop"] == stop
    assert not any("early_stop" in row for row in rows[:-1])
    state = json.loads((run / "checkpoint" / "train_state.json").read_text())
    assert state["step"] == 15 and state["early_stop"] == stop
    assert last_metrics(run / "checkpoint", 15)["early_stop"] == {"step": 15, "value": stop}  # moe info
    vals = iter([2.1])
    res = train(TrainArgs(None, [], run, {}, resume=True, quiet=True))
    assert res["final_step"] == 18 and res["stopped_early"]["passes"] == 4
    vals = iter([1.5, 1.6, 1.7, 1.8])  # the third pass after 1.5 is the last step's: a normal end
    res = train(TrainArgs(None, [], run, {}, resume=True, quiet=True))
    assert res["final_step"] == 30 and res["stopped_early"] is None
    state = json.loads((run / "checkpoint" / "train_state.json").read_text())
    assert state["early_stop"] == {"lowest_val_loss": 1.5, "lowest_step": 21, "passes": 3}
    assert "early_stop" not in last_metrics(run / "checkpoint", 30)  # the earlier stops are history
    monkeypatch.undo()
    bad = cli("train", recipe, corpus, "-o", tmp_path / "bad", "--patience", "-1")
    assert bad.returncode == 2 and "train.patience: must be >= 0" in bad.stderr, bad.stderr


def test_epochs_set_max_steps_from_the_training_tokens(tmp_path, corpus, tiny_recipe, cli):
    """--epochs E: max_steps = ceil(E x training tokens / (batch_size x seq_len)), recorded in the checkpoint's
    recipe (so --resume keeps it); refused with --max-steps, or when not > 0. Resuming with fewer steps than
    the checkpoint holds is refused, the run left as it was."""
    recipe = tiny_recipe(train={"eval_interval": 1000, "ckpt_interval": 1000})  # batch 4 x 32
    r = cli("train", recipe, corpus, "-o", tmp_path / "run", "-q", "--json", "--epochs", "0.05")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    expected = -(-0.05 * res["train_tokens"] // (4 * 32))
    assert res["steps"] == res["final_step"] == expected > 6  # not the recipe's 6
    assert res["epochs"] == pytest.approx(expected * 4 * 32 / res["train_tokens"]) and 0.05 <= res["epochs"] < 0.06
    cfg = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())
    assert cfg["recipe"]["train"]["max_steps"] == expected
    for args, message in [(("--epochs", "1", "--max-steps", "5"), "give --epochs or --max-steps, not both"),
                          (("--epochs", "0"), "--epochs: must be > 0, got 0.0")]:
        bad = cli("train", recipe, corpus, "-o", tmp_path / "bad", *args)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    fewer = cli("train", "-o", tmp_path / "run", "-q", "--resume", "--max-steps", "2")
    assert fewer.returncode == 2 and fewer.stderr.strip() == (
        f"error: train.max_steps (2): the checkpoint in {tmp_path / 'run'} is already at step {expected:.0f}; "
        "give more steps to continue it")
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics


def test_data_weights_mix_sources_with_their_own_validation(tmp_path, corpus, tiny_recipe, cli):
    """--data-weights 3,1 over two DATA arguments: each holds out its own tail; val_loss is the weighted mean of
    the sources' losses, each of which is `moe eval` on that source's tail. --resume with no DATA reuses the
    parts and weights (the same losses as the uninterrupted run); a resumed run may change the weights."""
    other = tmp_path / "other.txt"
    other.write_text("".join(f"Row {i}: a slow red fox walks under the busy cat {i % 5}.\n" for i in range(300)))
    recipe = tiny_recipe(train={"max_steps": 6, "ckpt_interval": 3})
    full = tmp_path / "full"
    data, mix = [str(corpus), str(other)], [3.0, 1.0]
    res = train(TrainArgs(str(recipe), data, full, quiet=True, data_weights=mix))
    sizes = [len(TEXT), len(other.read_bytes())]
    tails = [max(int(n * 0.05), 33) for n in sizes]
    assert [(m["source"], m["weight"], m["train_tokens"], m["val_tokens"]) for m in res["data_mix"]] == [
        (str(corpus), 0.75, sizes[0] - tails[0], tails[0]), (str(other), 0.25, sizes[1] - tails[1], tails[1])]
    assert res["val_from"] == "the last 0.05 of the tokens of each source"
    by_source = res["val_loss_by_source"]
    assert res["val_loss"] == pytest.approx(0.75 * by_source[str(corpus)] + 0.25 * by_source[str(other)])
    for src, tail in zip((corpus, other), tails):  # each source's tail gets 4 of the 2 x 4 validation windows
        tail_file = tmp_path / f"tail-{src.name}"
        tail_file.write_bytes(src.read_bytes()[-tail:])
        on_tail = json.loads(cli("eval", full, tail_file, "--seq-len", 32, "--max-windows", 4, "--json").stdout)
        assert on_tail["loss"] == pytest.approx(by_source[str(src)], rel=1e-5)
    per_source = json.loads(cli("eval", full, "--per-file", "--seq-len", 32, "--max-windows", 4, "--json").stdout)
    assert [(f["data"], f["tokens"]) for f in per_source["files"]] == [(str(corpus), 4 * 32), (str(other), 4 * 32)]
    assert [f["loss"] for f in per_source["files"]] == pytest.approx(list(by_source.values()), rel=1e-5)
    assert per_source["tokens"] == 4 * 32  # the joined tails, 4 windows over both
    state = json.loads((full / "checkpoint" / "train_state.json").read_text())
    assert state["data_weights"] == [0.75, 0.25]
    part = tmp_path / "part"
    train(TrainArgs(str(recipe), data, part, {"train.max_steps": 3}, quiet=True, data_weights=mix))
    train(TrainArgs(None, [], part, {"train.max_steps": 6}, resume=True, quiet=True))
    assert losses(part) == losses(full)
    assert json.loads((part / "metrics.jsonl").read_text().splitlines()[-1])["val_loss_by_source"] == by_source
    single = tmp_path / "single"  # the same files as one stream: other losses (the draws differ)
    train(TrainArgs(str(recipe), data, single, quiet=True))
    assert losses(single) != losses(full)
    one_text = cli("eval", single, "--per-file")
    assert one_text.returncode == 2 and one_text.stderr.startswith("error: --per-file: needs DATA")
    r = cli("train", "-o", part, "--resume", "--max-steps", 8, "--data-weights", "1,1", "--json", "-q")
    assert r.returncode == 0, r.stderr
    assert [m["weight"] for m in json.loads(r.stdout)["data_mix"]] == [0.5, 0.5]
    assert json.loads((part / "checkpoint" / "train_state.json").read_text())["data_weights"] == [0.5, 0.5]
    from moecli.commands.info import info
    shown = info(str(part))
    assert shown["data_mix"] == [{"source": str(corpus), "weight": 0.5, "tokens": sizes[0]},
                                 {"source": str(other), "weight": 0.5, "tokens": sizes[1]}]
    assert shown["val_loss_by_source"]["step"] == 8 and set(shown["val_loss_by_source"]["value"]) == set(data)
    for args, message in [
        ((recipe, corpus, other, "--data-weights", "1,2,3"), "--data-weights: 3 weights for 2 DATA arguments"),
        ((recipe, corpus, corpus, "--data-weights", "1,2"), f"DATA: {corpus} is given twice"),
        ((recipe, corpus, other, "--data-weights", "1,x"), "--data-weights: expected comma-separated numbers"),
        ((recipe, corpus, other, "--data-weights", "1,-1"), "--data-weights: every weight must be a positive"),
        (("-o", part, "--resume", corpus, "--max-steps", 9), f"DATA: the run in {part} mixes 2 sources"),
        (("-o", part, "--resume", "--data-weights", "1,1,1", "--max-steps", 9), "3 weights for the 2 sources"),
    ]:
        bad = cli("train", *args, *(() if "--resume" in args else ("-o", tmp_path / "bad")), "-q")
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and message in bad.stderr, bad.stderr


def test_init_takes_fine_tuning_defaults_that_keep_a_pretrained_models_loss(tmp_path, cli):
    """--init from a trained model takes fine-tuning defaults (lr 2e-5, no weight decay, 3% warmup) unless the
    command line sets them: 10 steps do not raise its validation loss, where the pretraining recipe's settings
    (lr 3e-3, warmup 20, weight decay 0.1) do."""
    import yaml

    from support.paths import SHARED_DATA

    if not (SHARED_DATA / "austen.txt").is_file():
        pytest.skip("needs ../shared/data/austen.txt")
    data = tmp_path / "d.txt"
    data.write_bytes((SHARED_DATA / "austen.txt").read_bytes()[:300_000])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tiny", "model": {"n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128,
                                  "context": 64},
        "moe": {"num_experts": 4, "top_k": 2, "expert_ffn": 64},
        "train": {"batch_size": 16, "seq_len": 64, "max_steps": 300, "warmup_steps": 10, "eval_interval": 100,
                  "eval_batches": 4, "ckpt_interval": 300}}))
    r = cli("train", recipe, data, "-o", tmp_path / "pre", "-q", "--json")
    assert r.returncode == 0, r.stderr
    pretrained = json.loads(r.stdout)["val_loss"]

    def fine_tune(name, *flags):
        r = cli("train", "--init", tmp_path / "pre", data, "-o", tmp_path / name, "--max-steps", "10", "-q", "--json",
                *flags)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    ft = fine_tune("ft")
    assert ft["finetune_defaults"] == {"lr": 2e-5, "weight_decay": 0.0, "warmup_steps": 1}
    saved = json.loads((tmp_path / "ft" / "checkpoint" / "config.json").read_text())["recipe"]["train"]
    assert (saved["lr"], saved["weight_decay"], saved["warmup_steps"]) == (2e-5, 0.0, 1)
    assert ft["val_loss"] <= pretrained  # the same validation windows as the pretraining run's last pass
    old = fine_tune("old", "--lr", "3e-3", "--set", "train.warmup_steps=20", "--set", "train.weight_decay=0.1")
    assert old["finetune_defaults"] is None
    assert old["val_loss"] > pretrained + 0.01
    part = fine_tune("part", "--lr", "1e-4")  # what the command line sets is its own; the rest are defaults
    assert part["finetune_defaults"] == {"weight_decay": 0.0, "warmup_steps": 1}
    r = cli("train", "--init", tmp_path / "pre", data, "-o", tmp_path / "shown", "--max-steps", "10", "-q")
    assert "fine-tuning defaults" in r.stdout and "lr 2e-05" in r.stdout


@pytest.mark.parametrize("name", ["mixtral", "qwen3-next", "gpt-oss"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(name):
    """train.activation_checkpointing recomputes each block in the backward (routing, the threaded or loop experts,
    a DeltaNet layer): the loss, the balance losses and every gradient equal the run that keeps the activations."""
    from moecli.config import apply_overrides, load_recipe
    from moecli.model.transformer import build_model

    x = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    results = []
    for on in (False, True):
        model = build_model(apply_overrides(load_recipe(name), {"train.activation_checkpointing": on}), seed=3)
        model.train()
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out.logits_BSV[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        (loss + out.balance_loss).backward()
        results.append((float(loss), float(out.balance_loss), {n: p.grad.clone() for n, p in model.named_parameters()
                                                              if p.grad is not None}))
    (l0, b0, g0), (l1, b1, g1) = results
    assert l0 == l1 and b0 == pytest.approx(b1, rel=1e-6) and g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_the_chunked_head_loss_equals_the_logits_cross_entropy(monkeypatch, tied, precision):
    """Training's loss (loss.head_cross_entropy: the head and its cross-entropy a chunk of tokens at a time, the
    gradients computed in the forward) against F.cross_entropy over the whole batch's logits: the loss and every
    parameter's gradient, under gradient accumulation's 1/accum, with 13-token chunks (several per batch)."""
    from moecli.model import loss as L
    from moecli.config import apply_overrides, load_recipe
    from moecli.model.transformer import autocast, build_model

    monkeypatch.setattr(L, "CHUNK_ELEMENTS", 13 * 256)
    assert L.chunk_tokens(256) == 13
    recipe = apply_overrides(load_recipe("mixtral"), {"model.tie_embeddings": tied})
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (3, 40), generator=g), torch.randint(0, 256, (3, 40), generator=g)
    results = []
    for chunked in (False, True):
        model = build_model(recipe, seed=1)
        model.train()
        with autocast(model, precision):
            out = model(x, targets_BS=y) if chunked else model(x)
        ce = out.ce if chunked else torch.nn.functional.cross_entropy(out.logits_BSV.flatten(0, 1).float(), y.flatten())
        assert (out.logits_BSV is None) == chunked
        ((ce + out.balance_loss) / 2).backward()
        results.append((float(ce), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    tol = 1e-5 if precision == "fp32" else 1e-2
    assert l1 == pytest.approx(l0, rel=tol)
    with torch.no_grad(), autocast(model, precision):  # validation and eval: the loss alone, no gradient made
        model.zero_grad(set_to_none=True)
        out = model(x, targets_BS=y)
    assert float(out.ce) == pytest.approx(l0, rel=tol) and not out.ce.requires_grad
    assert all(p.grad is None for p in model.parameters())
    for n in g0:  # to rounding of each gradient's largest value
        assert float((g1[n] - g0[n]).abs().max()) <= tol * float(g0[n].abs().max()) + 1e-9, n


def test_the_memory_estimate_bounds_a_real_run(tmp_path, cli):
    """moe train's estimate (train_memory: states + activations of a micro-batch) against the peak RSS the OS
    reports for the run, above the process's RSS before the model: within 1.1x, and not over twice the need."""
    import yaml

    recipe = tmp_path / "mid.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "mid", "model": {"n_layers": 4, "d_model": 256, "n_heads": 4, "n_kv_heads": 2, "context": 256},
        "moe": {"num_experts": 8, "top_k": 2, "expert_ffn": 512}, "balance": {"aux_loss_coef": 0.01},
        "train": {"batch_size": 16, "seq_len": 256, "max_steps": 3, "eval_interval": 100, "eval_batches": 1}}))
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"the {i % 17} cats sat on {i % 5} mats\n" for i in range(3000)))
    r = cli("train", recipe, corpus, "-o", tmp_path / "run", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    est, used = res["memory_estimate"]["peak"], res["peak_rss"] - res["rss_at_start"]
    assert "memory: about" in r.stderr and "MiB activations (16 x 256 tokens per micro-batch)" in r.stderr
    assert 0.5 * est <= used <= 1.1 * est, (used / 2**20, est / 2**20)


def test_the_memory_check_names_the_flags_that_fit(tmp_path, tiny_recipe, monkeypatch):
    """A run whose estimate exceeds the memory available is refused before anything is allocated, naming the
    flags under which it would fit; each named change really fits by the same estimate."""
    import dataclasses

    from moecli.config import load_recipe
    from moecli.errors import UserError
    from moecli.training import memory as M, setup as T
    from moecli.training.memory import Layout, training_memory, what_fits

    recipe = tiny_recipe(model={"vocab_size": 512, "n_layers": 8}, train={"batch_size": 32, "seq_len": 64})
    r = load_recipe(str(recipe))
    need = training_memory(r)
    assert training_memory(r, Layout(2, False, True))["states"] == pytest.approx(need["states"] / 2, rel=1e-6)
    ckpt = dataclasses.replace(r, train=dataclasses.replace(r.train, activation_checkpointing=True))
    assert training_memory(ckpt)["activations"] < need["activations"] / 2
    room = need["states"] + need["activations"] // 2
    monkeypatch.setattr(M, "available_memory", lambda: room)
    with pytest.raises(UserError, match=r"tiny: training needs about .* MiB activations \(32 x 64 tokens per "
                                        r"micro-batch\), .* available to this process; it fits with --grad-accum"):
        T.setup(T.TrainArgs(str(recipe), [], tmp_path / "run"))
    fits = what_fits(r, Layout(), room)
    assert "--activation-checkpointing" in fits
    assert not (tmp_path / "run").exists()


def test_kept_gradients_step_as_set_to_none_does():
    """Training keeps its gradients allocated and zeroes them in place (train.KeptGradients), and makes AdamW's
    state before the first step (create_optimizer_state): against zero_grad(set_to_none=True) and AdamW's own lazy
    state, the weights and moments after 4 steps are equal to the last bit, a parameter the backward reaches only
    on some steps included (AdamW skips it on the others, its weight decay too)."""
    from moecli.training.optim import KeptGradients, create_optimizer_state

    def run(kept: bool):
        torch.manual_seed(0)
        net = torch.nn.ModuleDict({"a": torch.nn.Linear(8, 8), "b": torch.nn.Linear(8, 8)})
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
        k = KeptGradients(net) if kept else None
        if k is not None:
            create_optimizer_state(opt, k)
            assert all(float(s["step"]) == 0 for s in opt.state.values()) and len(opt.state) == 4
        g = torch.Generator().manual_seed(1)
        for step in range(4):
            if k is not None:
                k.zero()
            else:
                opt.zero_grad(set_to_none=True)
            x = torch.randn(5, 8, generator=g)
            h = net["a"](x)
            if step % 2 == 0:  # "b" only on even steps
                h = net["b"](h)
            h.pow(2).mean().backward()
            if k is not None:
                k.drop_unreached()
                assert (net["b"].weight.grad is None) == (step % 2 == 1)
            opt.step()
        return ({n: p.detach().clone() for n, p in net.named_parameters()},
                [(float(s["step"]), s["exp_avg"].clone(), s["exp_avg_sq"].clone()) for s in opt.state.values()])

    (w0, s0), (w1, s1) = run(False), run(True)
    assert all(torch.equal(w0[n], w1[n]) for n in w0)
    assert [s[0] for s in s1] == [4.0, 4.0, 2.0, 2.0] == [s[0] for s in s0]
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(s0, s1))


def test_low_memory_mode_when_the_estimate_is_near_the_memory_available(tmp_path, tiny_recipe, monkeypatch):
    """Above LEAN_ABOVE of the memory available (but within it) training frees its gradients each step and asks
    for freed blocks to go back to the system (return_freed_memory, stubbed here: it would stay set for the rest of
    the test process); the summary says so, and the losses equal the default mode's to the last bit."""
    from moecli.config import load_recipe
    from moecli.training import memory as M, trainer as T
    from moecli.training.memory import training_memory

    recipe = tiny_recipe()
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"the {i % 13} dogs ran past {i % 7} gates\n" for i in range(400)))
    need = training_memory(load_recipe(str(recipe)))["peak"]
    calls = []
    monkeypatch.setattr(T, "return_freed_memory", lambda: calls.append(1) or True)
    runs = {}
    for lean, avail in ((False, 100 * need), (True, int(need / 0.9))):
        monkeypatch.setattr(M, "available_memory", lambda avail=avail: avail)
        res = T.train(T.TrainArgs(str(recipe), [str(corpus)], tmp_path / f"run{lean}", quiet=True))
        assert res["low_memory_mode"] is lean and len(calls) == int(lean)
        runs[lean] = [json.loads(line) for line in (tmp_path / f"run{lean}" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["loss"], r["grad_norm"]) for r in runs[True]] == [(r["loss"], r["grad_norm"]) for r in runs[False]]
    assert runs[True][-1]["val_loss"] == runs[False][-1]["val_loss"]


def test_rms_norm_keeps_less_for_its_backward_and_gives_autograds_gradients():
    """RMSNorm in fp32 training (attention._RMSNormFn): the output equal to the bit to the plain ops', the
    gradients of x and weight to float rounding of autograd's over those ops, one T x D tensor fewer kept."""
    from moecli.model.norm import RMSNorm

    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(64, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=g))
    x = torch.randn(3, 5, 64, generator=g, requires_grad=True)
    dy = torch.randn(3, 5, 64, generator=g)

    def reference(x):  # the ops RMSNorm.forward runs outside training, under autograd
        return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))

    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.shape) or t, lambda t: t):
        y = norm(x)
    n_fn = sum(1 for s in kept if s == x.shape)
    kept.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.shape) or t, lambda t: t):
        y_ref = reference(x)
    assert torch.equal(y, y_ref) and n_fn < sum(1 for s in kept if s == x.shape)
    gx, gw = torch.autograd.grad(y, (x, norm.weight), dy)
    rx, rw = torch.autograd.grad(y_ref, (x, norm.weight), dy)
    assert torch.allclose(gx, rx, rtol=1e-5, atol=1e-6) and torch.allclose(gw, rw, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(norm(x), y_ref)


def test_a_failed_start_leaves_nothing_and_a_resume_says_what_it_changes(tmp_path, corpus, tiny_recipe):
    """A run that fails before training (a bad line of a .jsonl file) removes the directory it made (one that was
    there stays); a resume with nothing left to train says so; one that stretches the schedule says how."""
    from moecli.errors import UserError

    recipe = str(tiny_recipe())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(UserError, match="bad.jsonl:2: not JSON"):
        train(TrainArgs(recipe, [str(bad)], tmp_path / "new", {}, quiet=True))
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(UserError):
        train(TrainArgs(recipe, [str(bad)], tmp_path / "kept", {}, quiet=True))
    assert (tmp_path / "kept").is_dir()
    run = tmp_path / "run"
    train(TrainArgs(recipe, [str(corpus)], run, {"train.max_steps": 4}, quiet=True))
    again = train(TrainArgs(None, [], run, {}, resume=True, quiet=True))
    assert again["nothing_trained"] and "nothing to train" in again["notes"][0]
    longer = train(TrainArgs(None, [], run, {"train.max_steps": 6}, resume=True, quiet=True))
    assert not longer["nothing_trained"] and "schedule is recomputed: cosine over 6 steps" in longer["notes"][0]
    assert train(TrainArgs(None, [], run, {"train.max_steps": 8}, resume=True, quiet=True))["final_step"] == 8
