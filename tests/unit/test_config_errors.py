"""Bad recipes: one-line error naming the file and field, exit code 2, no traceback."""

import json

import pytest

from moecli.config import apply_overrides, load_recipe
from moecli.errors import UserError

BAD = [
    ("moe:\n  num_expert: 8\n", "moe.num_expert: unknown key (did you mean 'num_experts'?)"),
    ("moe:\n  num_experts: 8\n  top_k: 9\n", "moe.top_k: must be between 1 and num_experts (8), got 9"),
    ("moe:\n  num_experts: 8\n  score_func: relu\n", "moe.score_func: must be 'softmax' or 'sigmoid'"),
    ("moe:\n  num_experts: 8\n  top_k: two\n", "moe.top_k: must be an integer, got 'two'"),
    ("model:\n  n_heads: 4\n  n_kv_heads: 3\n", "model.n_kv_heads: n_heads (4) must be a multiple of n_kv_heads (3)"),
    ("moe:\n  num_experts: 6\n  n_groups: 4\n", "moe.n_groups: must divide num_experts (6), got 4"),
    ("train:\n  lr: -1\n", "train.lr: must be > 0"),
    ("moe:\n  num_experts: 4\n  capacity_factor: -0.5\n", "moe.capacity_factor: must be >= 0"),
    ("moe:\n  num_experts: 4\n  eval_capacity_factor: -0.5\n",
     "moe.eval_capacity_factor: must be >= 0 (0 = dropless) or -1 (= capacity_factor), got -0.5"),
    ("moe: [1, 2]\n", "moe: must be a mapping"),
    ("trian:\n  lr: 1\n", "trian: unknown key (did you mean 'train'?)"),
    ("model:\n  context: 64\ntrain:\n  seq_len: 128\n", "train.seq_len: must be <= model.context (64)"),
    ("moe:\n  num_experts: 4\n  first_k_dense: 4\n", "moe.first_k_dense: leaves no MoE layer"),
    ("moe: {num_experts: 4, top_k: 1, random_routing: true}\n", "moe.random_routing: needs top_k >= 2"),
    ("model: {d_model: 128\n", "invalid YAML"),
    ("balance:\n  aux_loss_coef: yes\n", "balance.aux_loss_coef: must be a number"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_bad_recipe_message(tmp_path, text, message):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(UserError) as e:
        load_recipe(str(p))
    assert str(p) in str(e.value)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_scientific_notation_without_dot_is_a_number(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  lr: 1e-3\n")
    assert load_recipe(str(p)).train.lr == 0.001


def test_overrides_are_validated():
    r = load_recipe("mixtral")
    assert apply_overrides(r, {"moe.top_k": 1}).moe.top_k == 1
    with pytest.raises(UserError, match="moe.top_k: must be between 1 and num_experts"):
        apply_overrides(r, {"moe.top_k": 99})
    with pytest.raises(UserError, match="expected SECTION.FIELD"):
        apply_overrides(r, {"top_k": 1})


@pytest.mark.parametrize("text,message", BAD[:3])
def test_cli_bad_recipe_exit_2_one_line(cli, tmp_path, text, message):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    res = cli("build", p)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and message in lines[0] and "bad.yaml" in lines[0]
    assert res.stdout == ""


def test_cli_missing_recipe(cli):
    res = cli("build", "no-such-recipe")
    assert res.returncode == 2
    assert "no-such-recipe: no such recipe file" in res.stderr


def test_cli_build_writes_checkpoint_and_json(cli, tmp_path):
    out = tmp_path / "ckpt"
    res = cli("build", "mixtral", "-o", out, "--json", "--set", "model.n_layers=2")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["params"]["total"] > data["params"]["active"]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    # an existing output is never overwritten without --force
    before = (out / "model.safetensors").read_bytes()
    res2 = cli("build", "dense", "-o", out)
    assert res2.returncode == 2 and "not empty" in res2.stderr
    assert (out / "model.safetensors").read_bytes() == before
    info = cli("info", out, "--json")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["params"]["total"] == data["params"]["total"]


@pytest.mark.parametrize("command", ["build", "train"])
def test_cli_bad_set_option_exit_2(cli, tmp_path, command):
    r = cli(command, "mixtral", "--set", "nonsense", "-o", tmp_path / "m")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "error: --set nonsense: expected KEY=VALUE, e.g. --set train.lr=1e-3"
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("args,message", [
    (["eval", "{ckpt}", "-", "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    (["eval", "{ckpt}", "-", "--max-windows", "-3"], "--max-windows: must be >= 1, got -3"),
    (["eval", "{ckpt}", "-", "--seq-len", "0"], "--seq-len: must be between 1 and the model's context"),
    (["inspect-routing", "{ckpt}", "-", "--top-tokens", "-1"], "--top-tokens: must be >= 0, got -1"),
    (["inspect-routing", "{ckpt}", "-", "--seq-len", "0"], "--seq-len: must be between 1"),
    (["inspect-routing", "{ckpt}", "-", "--near-dead", "-1"], "--near-dead: must be >= 0"),
    (["generate", "{ckpt}", "-p", "hi", "--top-k", "-2"], "--top-k: must be >= 0"),
    (["generate", "{ckpt}", "-p", "hi", "--top-p", "1.5"], "--top-p: must be in (0, 1]"),
    (["generate", "{ckpt}", "-p", "hi", "--dtype", "fp8"], "--dtype: one of float32, bfloat16"),
    (["generate", "{ckpt}", "-p", "hi", "--num-samples", "0"], "--num-samples: must be >= 1, got 0"),
])
def test_cli_bad_numeric_options_exit_2(cli, tmp_path, tiny_recipe, args, message):
    ckpt = tmp_path / "ckpt"
    assert cli("build", tiny_recipe(), "-o", ckpt).returncode == 0
    r = cli(*[a.replace("{ckpt}", str(ckpt)) for a in args], input="hello world " * 100)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,line", [
    (["eval"], "error: moe eval: Missing argument 'checkpoint'. (see moe eval --help)"),
    (["generate", "x"],
     "error: moe generate: give --prompt TEXT (- for stdin) or --prompts FILE (see moe generate --help)"),
    (["train", "--bogus"], "error: moe train: No such option: --bogus (see moe train --help)"),
    (["train", "mixtral", "--max-steps", "abc"], "error: moe train: Invalid value for '--max-steps': "),
    (["nosuch"], "error: moe: No such command 'nosuch'. (see moe --help)"),
])
def test_usage_errors_are_one_line_exit_2(cli, args, line):
    r = cli(*args)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith(line), r.stderr


def test_no_arguments_prints_the_help_and_help_exits_0(cli):
    r = cli()
    assert r.returncode == 2 and "Usage" in r.stdout and "train" in r.stdout
    h = cli("train", "--help")
    assert h.returncode == 0 and "--val-data" in h.stdout and h.stderr == ""
    short = cli("train", "-h")
    assert short.returncode == 0 and short.stdout == h.stdout
    assert cli("-h").returncode == 0 and "inspect-routing" in cli("-h").stdout
    from moecli import __version__

    v = cli("--version")
    assert v.returncode == 0 and v.stdout == f"moecli {__version__}\n" and v.stderr == ""


@pytest.mark.parametrize("args", [["info"], ["info", "--json"], ["generate", "{ckpt}", "-p", "hi", "-n", "300"],
                                  ["eval", "{ckpt}", "-", "--per-file"]])
def test_a_closed_stdout_stops_quietly_with_141(tmp_path, tiny_recipe, cli, args):
    """`moe ... | head`: when the reader of stdout has gone, exit 141 (128 + SIGPIPE) with nothing on stderr,
    whether the output is streamed (generate), a rich table or JSON."""
    import subprocess
    import sys

    ckpt = tmp_path / "ckpt"
    assert cli("build", tiny_recipe(), "-o", ckpt).returncode == 0
    p = subprocess.Popen([sys.executable, "-m", "moecli.cli", *[a.replace("{ckpt}", str(ckpt)) for a in args]],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the first write
    _, err = p.communicate(input=b"some text to score " * 50, timeout=300)
    assert (p.returncode, err) == (141, b"")


def test_a_recipe_from_stdin_or_a_pipe(cli, tmp_path, tiny_recipe, monkeypatch):
    """`-` reads the recipe's YAML from stdin and a pipe (bash's <(command)) is read like a file: both were
    "no such recipe file". Stdin read once: not also as DATA; empty stdin is refused, not all defaults."""
    import os
    import subprocess
    import sys

    recipe = tiny_recipe()
    from_file = json.loads(cli("build", recipe, "--json").stdout)
    r = cli("build", "-", "--json", input=recipe.read_text())
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["params"] == from_file["params"] and json.loads(r.stdout)["recipe"] == "tiny"
    r = cli("build", "-", input="model: {d_model: -1}\n")
    assert r.returncode == 2 and r.stderr.strip() == "error: <stdin>: model.d_model: must be >= 1, got -1"
    r = cli("build", "-", input="")
    assert r.returncode == 2 and r.stderr.strip() == "error: <stdin>: no recipe: standard input was empty"
    (tmp_path / "c.txt").write_text("some text " * 200)
    r = cli("train", "-", "-", "-o", tmp_path / "run", input=recipe.read_text())
    assert r.returncode == 2 and "RECIPE -: standard input can be read once" in r.stderr
    assert not (tmp_path / "run").exists()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen([sys.executable, "-c", f"open({str(fifo)!r}, 'w').write({recipe.read_text()!r})"])
    assert load_recipe(str(fifo)).to_dict() == load_recipe(str(recipe)).to_dict()
    writer.wait()
    # torchrun starts every rank with the same command line: each would read the recipe
    from moecli.training.setup import TrainArgs, check_recipe_source

    monkeypatch.setenv("WORLD_SIZE", "2")
    for once in ("-", str(fifo)):
        with pytest.raises(UserError, match=f"^RECIPE {once}: under torchrun every process reads the recipe"):
            check_recipe_source(TrainArgs(once, [str(tmp_path / "c.txt")]))
    check_recipe_source(TrainArgs(str(recipe), [str(tmp_path / "c.txt")]))  # a file: every rank reads it


def test_nested_too_deeply_is_bad_input(tmp_path, cli):
    """A 5000-deep YAML or JSON nest is one line, exit 2 (PyYAML and json recurse: was RecursionError, exit 1)."""
    deep = tmp_path / "deep.yaml"
    deep.write_text("model: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n")
    r = cli("build", deep)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {deep}: invalid YAML: nested too deeply"
    r = cli("build", "mixtral", "--set", "model.n_layers=" + "[" * 5000)
    assert r.returncode == 2 and "nested too deeply" in r.stderr and len(r.stderr.splitlines()) == 1
    ckpt = tmp_path / "hf"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"a": ' + "[" * 5000 + "]" * 5000 + "}")
    r = cli("info", ckpt)
    assert r.returncode == 2 and "nested too deeply" in r.stderr and len(r.stderr.splitlines()) == 1


def test_huge_recipe_is_measured_and_refused_in_seconds(tmp_path, cli):
    """100,000 layers of d_model 100,000: counted without building the model (was minutes of module
    construction), and refused where it would be allocated."""
    import time

    big = tmp_path / "big.yaml"
    big.write_text("model: {n_layers: 100000, d_model: 100000}\n")
    t0 = time.monotonic()
    r = cli("build", big, "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)["params"]
    D, F, V, L = 100000, 512, 256, 100000
    per_layer = 2 * D + 2 * D * D + 2 * D * D // 2 + 3 * D * F  # norms, wq+wo, wk+wv (2 of 4 heads), FFN
    assert p["total"] == 2 * V * D + D + L * per_layer
    r = cli("build", big, "-o", tmp_path / "out", timeout=120)
    assert r.returncode == 2 and "float32 weights" in r.stderr and not (tmp_path / "out").exists()
    r = cli("train", big, "-o", tmp_path / "run", "--max-steps", "1", timeout=120)
    assert r.returncode == 2 and "AdamW state" in r.stderr
    assert time.monotonic() - t0 < 60  # each took minutes; now a few seconds each (no timing target here)
