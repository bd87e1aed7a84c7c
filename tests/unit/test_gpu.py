"""On a CUDA GPU (skipped elsewhere; benchmarks/gpu_check.sh runs them): the grouped-GEMM experts, training,
evaluation and greedy decoding on --device cuda against the CPU."""

import json

import pytest
import torch

from moecli.moe import experts as X

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_experts_take_the_grouped_gemm_on_the_gpu_and_equal_the_loop():
    torch.manual_seed(0)
    counts = torch.tensor([300, 0, 170, 1, 330, 23, 0, 200])
    ex = X.GroupedExperts(len(counts), 256, 512, bias=True, act="clamped_swiglu").cuda()
    x = torch.randn(int(counts.sum()), 256, device="cuda", requires_grad=True)
    g = torch.randn_like(x)
    out = {}
    for grouped in (False, None):  # the loop, forced; then the default, which must be the grouped GEMM
        X.GROUPED_MM = grouped
        x.grad = None
        ex.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = ex(x, counts.cuda())
        assert ex.last_path == ("loop" if grouped is False else "grouped_mm")
        y.float().backward(g)
        out[grouped] = [y.detach().float(), x.grad.float(), ex.w1_EDF.grad.float(), ex.b2_ED.grad.float()]
    X.GROUPED_MM = None
    for a, b in zip(out[False], out[None]):
        assert float((a - b).abs().max()) <= 2e-2 * float(a.abs().max())


def test_train_eval_generate_on_the_gpu(tmp_path, tiny_recipe, cli):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"the {i % 17} cats sat on {i % 5} mats\n" for i in range(500)))
    recipe = tiny_recipe(train={"max_steps": 6, "eval_interval": 6, "ckpt_interval": 6})
    runs = {}
    for dev in ("cpu", "cuda"):
        r = cli("train", recipe, corpus, "-o", tmp_path / dev, "-q", "--json", "--device", dev)
        assert r.returncode == 0, r.stderr
        runs[dev] = json.loads(r.stdout)
    assert runs["cuda"]["device"].startswith("cuda")
    assert runs["cuda"]["final_loss"] == pytest.approx(runs["cpu"]["final_loss"], rel=1e-3)
    evals = [json.loads(cli("eval", tmp_path / "cuda", corpus, "--json", "--device", d).stdout)["loss"]
             for d in ("cpu", "cuda")]
    assert evals[1] == pytest.approx(evals[0], rel=1e-4)
    gens = [json.loads(cli("generate", tmp_path / "cuda", "--prompt", "the 3 cats", "--max-new-tokens", "12",
                           "--temperature", "0", "--json", "--device", d).stdout) for d in ("cpu", "cuda")]
    assert gens[0]["completion"] == gens[1]["completion"]
    r = cli("train", recipe, corpus, "-o", tmp_path / "bf16", "-q", "--json", "--device", "cuda",
            "--precision", "bf16-mixed")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["final_loss"] == pytest.approx(runs["cpu"]["final_loss"], rel=2e-2)
