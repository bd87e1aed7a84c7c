"""moe prune from the command line on a moecli checkpoint: the output is a moecli checkpoint the other commands read,
its scores saved and reusable, the layer-streamed pass equal to the in-memory one, inspect-routing showing the same
REAP scores, and every bad input refused in one line with nothing written."""

import json

import pytest

TEXT = "".join(f"Line {i}: it is a truth universally acknowledged, that a fox {i * 7 % 13} jumps.\n" for i in range(200))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from moecli.commands.build import build

    d = tmp_path_factory.mktemp("prune")
    build("mixtral", d / "m", {"model.n_layers": 2, "model.d_model": 64, "moe.expert_ffn": 64})
    (d / "t.txt").write_text(TEXT)
    return d


def test_prune_writes_a_moecli_checkpoint_the_other_commands_read(built, tmp_path, cli):
    m, text = built / "m", built / "t.txt"
    r = cli("prune", m, text, "-o", tmp_path / "p", "--ratio", "0.5", "--seq-len", "64", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert (res["experts"], res["keep"], res["method"]) == (8, 4, "reap")
    assert res["loss_after"] == pytest.approx(res["loss_before"] + res["loss_increase"])
    for layer in res["layers"].values():
        assert len(layer["kept"]) == 4 and sorted(layer["kept"] + layer["dropped"]) == list(range(8))
        assert min(layer["scores"][e] for e in layer["kept"]) >= max(layer["scores"][e] for e in layer["dropped"])
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert cfg["recipe"]["moe"]["num_experts"] == 4 and cfg["source"]["prune"]["method"] == "reap"
    ev = cli("eval", tmp_path / "p", text, "--seq-len", "64", "--json")
    assert ev.returncode == 0, ev.stderr
    info = json.loads(cli("info", tmp_path / "p", "--json").stdout)
    assert "4" in json.dumps(info)
    # the scores again, at another count: no calibration pass, the same ranking
    scores = tmp_path / "p" / "prune_scores.json"
    again = cli("prune", m, "-o", tmp_path / "p2", "--keep", "2", "--scores", scores, "--json")
    assert again.returncode == 0, again.stderr
    two = json.loads(again.stdout)
    assert "scores" in two["calibration"] and "loss_before" not in two
    for i, layer in two["layers"].items():
        assert set(layer["kept"]) <= set(res["layers"][i]["kept"])
        assert layer["scores"] == pytest.approx(res["layers"][i]["scores"])


def test_streamed_pass_and_inspect_routing_give_the_same_scores(built, tmp_path, cli):
    m, text = built / "m", built / "t.txt"
    args = ("--keep", "4", "--seq-len", "32", "--max-tokens", "2048", "--json")
    whole = json.loads(cli("prune", m, text, "-o", tmp_path / "a", *args, "--holdout", "0").stdout)
    streamed = json.loads(cli("prune", m, text, "-o", tmp_path / "b", *args, "--holdout", "0", "--stream").stdout)
    assert streamed["streamed"] == "--stream"
    for i, layer in whole["layers"].items():
        assert streamed["layers"][i]["kept"] == layer["kept"]
        assert streamed["layers"][i]["reap"] == pytest.approx(layer["reap"], rel=1e-5)
    r = cli("inspect-routing", m, text, "--seq-len", "32", "--max-tokens", "2048", "--json")
    assert r.returncode == 0, r.stderr
    routing = json.loads(r.stdout)["layers"]
    for i, layer in whole["layers"].items():
        assert [e["reap"] for e in routing[i]["experts"]] == pytest.approx(layer["reap"], rel=1e-5)
        assert [e["load"] for e in routing[i]["experts"]] == layer["tokens_routed"]
    text_out = cli("inspect-routing", m, text, "--seq-len", "32", "--max-tokens", "2048").stdout
    assert "REAP" in text_out


def test_random_pruning_is_seeded(built, tmp_path, cli):
    m, text = built / "m", built / "t.txt"
    args = ("--keep", "4", "--method", "random", "--seq-len", "64", "--holdout", "0", "--json")
    a = json.loads(cli("prune", m, text, "-o", tmp_path / "a", *args, "--seed", "1").stdout)
    b = json.loads(cli("prune", m, text, "-o", tmp_path / "b", *args, "--seed", "1").stdout)
    c = json.loads(cli("prune", m, text, "-o", tmp_path / "c", *args, "--seed", "2").stdout)
    kept = [[L["kept"] for L in r["layers"].values()] for r in (a, b, c)]
    assert kept[0] == kept[1] and kept[0] != kept[2]


BAD = [
    (("--ratio", "0"), "--ratio: must be between 0 and 1"),
    (("--ratio", "1"), "--ratio: must be between 0 and 1"),
    (("--keep", "8"), "--keep 8: must keep fewer than the model's 8 routed experts"),
    (("--keep", "1"), "--keep 1: fewer than the 2 experts each token is routed to (top_k)"),
    (("--keep", "4", "--ratio", "0.5"), "give --ratio R"),
    (("--keep", "4", "--method", "best"), "--method: one of reap, ean, frequency, random"),
    (("--keep", "4", "--holdout", "1"), "--holdout: must be in [0, 1)"),
    (("--keep", "4", "--seq-len", "9999"), "--seq-len: must be between 1 and the model's context"),
    (("--keep", "4", "--max-tokens", "60"), "54 tokens to calibrate on (after the --holdout tail); need at least one "
                                           "window of 128"),
    (("--keep", "4", "--max-tokens", "60", "--seq-len", "16"), "the held-out tail (--holdout 0.1) is 6 tokens"),
    (("--keep", "4", "--scores", "{m}/config.json"), "not a prune_scores.json"),
    (("--keep", "4", "--scores", "{m}/missing.json"), "missing.json: cannot read prune scores"),
]


@pytest.mark.parametrize("flags,message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_input_is_one_line_and_writes_nothing(built, tmp_path, cli, flags, message):
    out = tmp_path / "out"
    r = cli("prune", built / "m", built / "t.txt", "-o", out, *[f.replace("{m}", str(built / "m")) for f in flags])
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def test_other_models_dense_models_and_outputs_inside_the_input_are_refused(built, tmp_path, cli):
    from moecli.commands.build import build

    m, text = built / "m", built / "t.txt"
    build("mixtral", tmp_path / "other", {"model.n_layers": 2, "model.d_model": 64, "moe.expert_ffn": 64,
                                          "train.seed": 9})
    build("dense", tmp_path / "dense", {"model.n_layers": 1})
    first = cli("prune", m, text, "-o", tmp_path / "p", "--keep", "4", "--seq-len", "64", "--holdout", "0")
    assert first.returncode == 0, first.stderr
    cases = [
        (("prune", tmp_path / "other", "-o", tmp_path / "q", "--keep", "4", "--scores",
          tmp_path / "p" / "prune_scores.json"), "scores of another model"),
        (("prune", tmp_path / "dense", text, "-o", tmp_path / "q", "--keep", "4"), "has no MoE layers"),
        (("prune", m, text, "-o", m / "inside", "--keep", "4"), "must not be the input checkpoint, inside it"),
        (("prune", m, "-o", tmp_path / "q", "--keep", "4"), "DATA: give the calibration text"),
        (("prune", m, text, "--keep", "4"), "-o/--output: required"),
    ]
    for args, message in cases:
        r = cli(*args)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert not (tmp_path / "q").exists() and not (m / "inside").exists()
