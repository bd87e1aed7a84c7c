"""Layer streaming: moe eval and moe inspect-routing reading one decoder layer at a time (layerwise.stream_forward)
give the in-memory run's loss and routing; chosen by themselves when the weights do not fit, and said so."""

import json

import pytest
import torch

from support.hf_models import make

from moecli.parallel import device
from moecli.commands.evaluate import evaluate
from moecli.formats.layerwise import HiddenStore
from moecli.commands.inspect_routing import inspect_routing


@pytest.fixture
def text(tmp_path):
    t = tmp_path / "t.txt"
    t.write_text("".join(f"{i}: one layer at a time, and every batch through it\n" for i in range(60)))
    return t


@pytest.mark.parametrize("kind", ["moecli", "deepseek_v3", "gpt_oss", "llama4_text"])
def test_streamed_eval_and_routing_equal_the_in_memory_run(tmp_path, cli, text, kind):
    if kind == "moecli":
        ckpt = tmp_path / "m"
        r = cli("build", "deepseek-v3", "-o", ckpt, "--set", "model.n_layers=3")
        assert r.returncode == 0, r.stderr
    else:
        ckpt = tmp_path / kind
        make(kind, ckpt, vocab_size=256)
    args = dict(seq_len=32, batch_size=3, max_windows=None)
    mem = evaluate(str(ckpt), [str(text)], **args)
    st = evaluate(str(ckpt), [str(text)], **args, stream=True)
    assert "streamed" not in mem and st["streamed"]["why"] == "--stream"
    assert st["loss"] == pytest.approx(mem["loss"], rel=1e-5) and st["tokens"] == mem["tokens"]
    a = inspect_routing(str(ckpt), [str(text)], seq_len=32, batch_size=3)
    b = inspect_routing(str(ckpt), [str(text)], seq_len=32, batch_size=3, stream=True)
    assert a["layers"].keys() == b["layers"].keys()
    for layer in a["layers"]:
        for ea, eb in zip(a["layers"][layer]["experts"], b["layers"][layer]["experts"]):
            assert ea["load"] == pytest.approx(eb["load"], abs=1e-6)
    r = cli("eval", ckpt, text, "--stream", "--seq-len", "32")
    assert r.returncode == 0 and "read one layer at a time (--stream)" in r.stderr


def test_a_model_larger_than_memory_is_streamed_by_itself(tmp_path, text, monkeypatch):
    ckpt = tmp_path / "g"
    make("gpt_oss", ckpt, vocab_size=256)
    ref = evaluate(str(ckpt), [str(text)], seq_len=32, batch_size=4, max_windows=None)
    monkeypatch.setattr(device, "available_memory", lambda: 10_000)  # 10 kB: no model fits
    got = evaluate(str(ckpt), [str(text)], seq_len=32, batch_size=4, max_windows=None)
    assert "exceed" in got["streamed"]["why"] and got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert got["streamed"]["expected_peak_bytes"] > got["streamed"]["largest_piece_bytes"] > 0
    res = inspect_routing(str(ckpt), [str(text)], seq_len=32)
    assert "exceed" in res["streamed"]["why"]
    with pytest.raises(Exception, match="--domain: not with a model read one layer at a time"):
        inspect_routing(str(ckpt), [str(text)], seq_len=32, domains=[f"x={text}"])


def test_hidden_store_round_trips_batches(tmp_path):
    shapes = [(3, 5, 4), (1, 5, 4)]
    s = HiddenStore(tmp_path / "h.bin", shapes)
    xs = [torch.randn(sh) for sh in shapes]
    for b, x in enumerate(xs):
        s.put(b, x)
    assert all(torch.equal(s.get(b), x) for b, x in enumerate(xs))
    s.close()


@pytest.mark.parametrize("name,total,active", [("deepseek-v3", 671.0e9, 37.6e9), ("kimi-k2", 1026e9, 32.9e9),
                                               ("gpt-oss-120b", 116.8e9, 5.7e9), ("qwen3-30b-a3b", 30.5e9, 3.35e9)])
def test_info_on_a_real_config_alone_says_what_loading_and_streaming_need(tmp_path, cli, name, total, active):
    """The released config.json of each (tests/configs), no weights: parameters (DeepSeek-V3 671B without its
    multi-token-prediction layer, GPT-OSS-120b 116.8B, Qwen3-30B-A3B 30.5B), the memory the weights need, and
    layer streaming's: the largest piece is one MoE layer, far below the whole."""
    import shutil
    from pathlib import Path

    shutil.copyfile(Path(__file__).parent.parent / "configs" / f"{name}.json", tmp_path / "config.json")
    r = cli("info", tmp_path, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["params"]["total"] == pytest.approx(total, rel=2e-3)
    assert res["params"]["active"] == pytest.approx(active, rel=1e-2)
    m, moe_rows = res["memory"], [row for row in res["params"]["layers"] if row["kind"] == "moe"]
    assert m["bfloat16_bytes"] == 2 * res["params"]["total"] and res["weights"] is None
    assert m["stream_bfloat16"]["largest_piece_bytes"] == 2 * max(row["total"] for row in moe_rows)
    assert m["stream_bfloat16"]["expected_peak_bytes"] < m["bfloat16_bytes"] / 8
    r = cli("info", tmp_path)
    assert "layer by layer" in r.stdout and "a config.json alone" in r.stdout
