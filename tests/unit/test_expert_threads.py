"""The threaded CPU expert path (experts._ThreadedSwiGLU on cpu_threads workers) equals the loop.

Bitwise against the loop run on one intra-op thread (every product is then single-threaded on both
sides), except the w1/w3 gradients, which the threaded path computes from a contiguous x^T: those are
checked to be as close to an fp64 reference as the loop's. Against the loop on two threads only to
rounding: torch's own matrix products give thread-count-dependent last bits for some shapes (e.g.
241 x 1024 @ 1024 x 512 in bf16).
"""

import json
import os
import sys
import time

import pytest
import torch

from moecli.moe import cpu_threads
from moecli.moe import experts as X
from moecli.config import BalanceConfig, MoEConfig
from moecli.errors import UserError
from moecli.moe.layer import MoELayer
from moecli.training.setup import TrainArgs
from moecli.training.trainer import train


@pytest.fixture
def two_threads(monkeypatch):
    """The threaded path needs >= 2 intra-op threads; give the test two even on a 1-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.delenv("MOECLI_EXPERT_THREADS", raising=False)
    yield
    torch.set_num_threads(before)
    X.THREADED = X.PAD_ROWS = None


def run_experts(ex, x, counts, g, mode, w=None, autocast=False):
    """Forward + backward on the threaded path (mode True) or the loop on one intra-op thread."""
    X.THREADED = mode
    torch.set_num_threads(2 if mode else 1)
    x.grad = None
    if w is not None:
        w.grad = None
    ex.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert (X.use_threads(x, ex.w1_EDF) is not None) == mode  # the path under test really runs
        y = ex(x, counts, w)
    assert ex.last_path == ("threaded" if mode else "loop")
    y.backward(g.to(y.dtype))
    torch.set_num_threads(2)
    grads = [x.grad] + [p.grad for p in (ex.w1_EDF, ex.w3_EDF, ex.w2_EFD)]
    return [y.detach()] + grads + ([w.grad] if w is not None else [])


SHAPES = {"small": (32, 48, [300, 0, 17, 1, 250, 0]),
          "expert-size": (512, 1024, [241, 0, 256, 1, 258])}  # 241 rows: 1 and 2 threads differ in bf16


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_threaded_equals_loop_bitwise(two_threads, dtype, weighted, shape):
    """Output, input gradient, w2's gradient and (weighted: y * w per row, as the layer's combine
    uses) the row weights' gradient equal to the last bit; the w1 and w3 gradients as accurate
    as the loop's; experts with no tokens get zero gradients; uneven loads are split over the workers."""
    torch.manual_seed(0)
    D, Fh, counts = SHAPES[shape]
    ex = X.GroupedExperts(len(counts), D, Fh).to(dtype)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), D, dtype=dtype, requires_grad=True)
    w = torch.rand(len(x), requires_grad=True) if weighted else None  # fp32, as the router gives them
    g = torch.randn_like(x)
    loop, threaded = run_experts(ex, x, counts, g, False, w), run_experts(ex, x, counts, g, True, w)
    assert len(threaded) == (6 if weighted else 5)
    for i, (a, b) in enumerate(zip(loop, threaded)):
        assert a.dtype == b.dtype
        if i not in (2, 3):
            assert torch.equal(a, b)
    for i, ref in zip((2, 3), fp64_grads(ex, x, counts, g, w)):  # w1, w3
        err_loop, err_threaded = ((t.double() - ref).abs().max() for t in (loop[i], threaded[i]))
        assert err_threaded <= 1.25 * err_loop
        torch.testing.assert_close(threaded[i], loop[i])
    assert threaded[2][1].abs().sum() == 0 and threaded[4][1].abs().sum() == 0  # w1 and w2 of expert 1 (no rows)


def fp64_grads(ex, x, counts, g, w=None):
    """The loop's w1 and w3 gradients computed in fp64 from the same values."""
    ex64 = X.GroupedExperts(ex.num_experts, ex.d_model, ex.hidden).double()
    ex64.load_state_dict({k: v.double() for k, v in ex.state_dict().items()})
    w64 = None if w is None else w.detach().double()
    X.THREADED = False
    ex64(x.detach().double(), counts, w64).backward(g.double())
    return ex64.w1_EDF.grad, ex64.w3_EDF.grad


def test_threaded_equals_loop_bitwise_under_autocast(two_threads):
    """fp32 parameters and input under a bf16 autocast: the same bf16 output and fp32 gradients as
    the loop, to the bit (x's gradient summed in fp32 from its two uses, as autocast's casts do),
    except w1's and w3's, which are as accurate as the loop's (as in the test above)."""
    torch.manual_seed(0)
    ex = X.GroupedExperts(4, 64, 96)
    counts = torch.tensor([100, 3, 0, 97])
    x = torch.randn(200, 64, requires_grad=True)
    w = torch.rand(200, requires_grad=True)
    g = torch.randn(200, 64)
    loop, threaded = run_experts(ex, x, counts, g, False, w, True), run_experts(ex, x, counts, g, True, w, True)
    assert threaded[0].dtype == torch.bfloat16 and threaded[1].dtype == torch.float32
    for i, (a, b) in enumerate(zip(loop, threaded)):
        assert a.dtype == b.dtype
        if i not in (2, 3):
            assert torch.equal(a, b)
    for i, ref in zip((2, 3), fp64_grads(ex, x, counts, g, w)):
        err_loop, err_threaded = ((t.double() - ref).abs().max() for t in (loop[i], threaded[i]))
        assert err_threaded <= 1.25 * err_loop


def test_threaded_layer_under_autocast_matches_the_loop(two_threads):
    """The whole MoE layer (router, shared expert, combine, balance loss) under a bf16 autocast on
    either expert path, both on two threads: equal up to the products' thread-dependent rounding."""
    torch.manual_seed(0)
    layer = MoELayer(32, MoEConfig(num_experts=4, top_k=2, expert_ffn=48, num_shared_experts=1),
                     BalanceConfig(aux_loss_coef=0.01, z_loss_coef=0.001))
    x = torch.randn(2, 100, 32, requires_grad=True)
    results = []
    for mode in (False, True):
        X.THREADED = mode
        x.grad = None
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        assert layer.experts.last_path == ("threaded" if mode else "loop")
        (y.float().pow(2).mean() + layer.aux["aux"]).backward()
        results.append([y.detach(), x.grad] + [p.grad for p in layer.parameters()])
    assert results[1][0].dtype == torch.bfloat16 and results[1][1].dtype == torch.float32
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-4)


def test_training_is_the_same_with_and_without_threads(two_threads, tmp_path, tiny_recipe):
    """A short fp32 run gives the same losses on either path, to rounding."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i}: a b c {i % 7}\n" for i in range(300)))
    recipe = str(tiny_recipe(train={"max_steps": 3, "eval_interval": 3, "ckpt_interval": 3}))
    runs = {}
    for mode in (False, True):
        X.THREADED = mode
        out = tmp_path / f"t{mode}"
        train(TrainArgs(recipe, [str(corpus)], out, quiet=True))
        runs[mode] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").open()]
    assert len(runs[True]) == 3 and runs[True] == pytest.approx(runs[False], rel=1e-5)


def test_padded_rows_sizes():
    """Row counts round up to 16 sizes per doubling (at most 1/16 extra from 256 rows up), so a
    training run meets few distinct product shapes."""
    assert [X.padded_rows(n) for n in (0, 1, 16, 17, 255, 256, 257, 1000, 1024, 1025)] == \
        [0, 16, 16, 32, 256, 256, 272, 1024, 1024, 1088]
    sizes = [X.padded_rows(n) for n in range(1, 8193)]
    assert all(m >= n for n, m in enumerate(sizes, 1)) and sizes == sorted(sizes)
    assert all(m - n <= n / 16 for n, m in enumerate(sizes, 1) if n >= 256)
    assert len(set(sizes[255:4096])) == 4 * 16 + 1  # rows 256..4096, four doublings: 256, 272, ..., 4096


def test_pad_rows_for_16_bit_compute_on_the_cpu(two_threads):
    ex = X.GroupedExperts(2, 8, 8)
    x = torch.empty(3, 8)
    assert not X.pad_rows(x, ex.w1_EDF)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert X.pad_rows(x, ex.w1_EDF)
    assert X.pad_rows(x.bfloat16(), ex.to(torch.bfloat16).w1_EDF)
    X.PAD_ROWS = True
    assert X.pad_rows(x, ex.float().w1_EDF)


@pytest.mark.parametrize("dtype,mode", [(torch.float64, False), (torch.float32, False), (torch.float32, True)])
def test_padding_the_rows_changes_no_result(two_threads, dtype, mode):
    """The zero rows added by PAD_ROWS add nothing to the output or to any gradient, on either path
    (forced on here in fp64/fp32, where it is off by default, to compare against the unpadded run;
    the threaded path does not take fp64). Equal to rounding: every element within 1e-6 (fp32) or 1e-12
    (fp64) of its tensor's largest magnitude. The BLAS may block a product of more rows differently, so
    the last bits of a sum can differ (seen on an AMD EPYC: 2^-30 in x's gradient, 4e-18 in fp64), where
    any padded row that reached a result would move it by the size of the values themselves."""
    torch.manual_seed(0)
    ex = X.GroupedExperts(5, 64, 96).to(dtype)
    counts = torch.tensor([100, 3, 0, 1, 97])  # padded to 112, 16, 0, 16, 112
    x = torch.randn(201, 64, dtype=dtype, requires_grad=True)
    w = torch.rand(201, dtype=dtype, requires_grad=True)
    g = torch.randn(201, 64, dtype=dtype)
    runs = []
    for pad in (False, True):
        X.PAD_ROWS, X.THREADED = pad, mode
        x.grad = w.grad = None
        ex.zero_grad(set_to_none=True)
        y = ex(x, counts, w)
        y.backward(g)
        assert ex.last_path == ("threaded" if mode else "loop") and y.shape == x.shape
        runs.append([y.detach(), x.grad, w.grad] + [p.grad for p in ex.parameters()])
    eps = 1e-12 if dtype == torch.float64 else 1e-6
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=eps * float(b.abs().max()))
    assert runs[1][3][2].abs().sum() == 0  # expert 2 has no rows: still a zero gradient


def test_second_backward_fails_as_usual(two_threads):
    X.THREADED = True
    ex = X.GroupedExperts(2, 8, 8)
    y = ex(torch.randn(10, 8, requires_grad=True), torch.tensor([6, 4]))
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()


def test_choice_of_path(two_threads, monkeypatch):
    ex16 = X.GroupedExperts(8, 256, 512).to(torch.bfloat16)
    assert X.use_threads(torch.empty(8192, 256, dtype=torch.bfloat16), ex16.w1_EDF) == torch.bfloat16  # 2^30
    assert X.use_threads(torch.empty(8191, 256, dtype=torch.bfloat16), ex16.w1_EDF) is None  # just under
    assert X.use_threads(torch.empty(4, 256, dtype=torch.bfloat16), ex16.w1_EDF) is None  # decoding
    ex32 = X.GroupedExperts(8, 256, 512)
    assert X.use_threads(torch.empty(2**15, 256), ex32.w1_EDF) is None  # fp32, 8 experts: the loop
    ex32m = X.GroupedExperts(32, 256, 512)
    assert X.use_threads(torch.empty(2**15, 256), ex32m.w1_EDF) == torch.float32  # 32 experts, 2^32, a backward
    assert X.use_threads(torch.empty(2**15 - 1, 256), ex32m.w1_EDF) is None  # just under 2^32
    with torch.no_grad():
        assert X.use_threads(torch.empty(2**15, 256), ex32m.w1_EDF) is None  # fp32 forward alone: the loop
    frozen = X.GroupedExperts(32, 256, 512).requires_grad_(False)
    assert X.use_threads(torch.empty(2**15, 256), frozen.w1_EDF) is None  # nothing needs a gradient
    assert X.use_threads(torch.empty(2**15, 256, requires_grad=True), frozen.w1_EDF) == torch.float32
    x32, counts = torch.randn(2**15, 256), torch.full((32,), 2**10)
    ex32m(x32, counts).sum().backward()  # the experts' forward takes the path use_threads names
    assert ex32m.last_path == "threaded" and ex32m.w1_EDF.grad is not None
    with torch.no_grad():
        ex32m(x32, counts)
    assert ex32m.last_path == "loop"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert X.use_threads(torch.empty(8192, 256), ex32.w1_EDF) == torch.bfloat16
    monkeypatch.setenv("MOECLI_EXPERT_THREADS", "on")
    assert X.use_threads(torch.empty(4, 256), ex32.w1_EDF) == torch.float32
    monkeypatch.setenv("MOECLI_EXPERT_THREADS", "off")
    assert X.use_threads(torch.empty(8192, 256, dtype=torch.bfloat16), ex16.w1_EDF) is None
    monkeypatch.setenv("MOECLI_EXPERT_THREADS", "sometimes")
    with pytest.raises(UserError, match="MOECLI_EXPERT_THREADS: must be auto, on or off, got 'sometimes'"):
        X.use_threads(torch.empty(8192, 256), ex32.w1_EDF)
    torch.set_num_threads(1)
    monkeypatch.setenv("MOECLI_EXPERT_THREADS", "on")
    assert X.use_threads(torch.empty(8192, 256), ex32.w1_EDF) is None  # one thread: nothing to split over


def test_bad_env_is_a_one_line_error(cli, tmp_path):
    r = cli("build", "mixtral", "-o", tmp_path / "m", env={"MOECLI_EXPERT_THREADS": "yes please"})
    assert r.returncode == 2 and not (tmp_path / "m").exists()
    assert r.stderr.strip() == "error: MOECLI_EXPERT_THREADS: must be auto, on or off, got 'yes please'"


def test_worker_errors_reach_the_caller_and_the_pool_goes_on(two_threads):
    pool = cpu_threads.pool()
    assert pool.num_workers == 2
    done = []

    def bad():
        raise ValueError("job failed")

    with pytest.raises(ValueError, match="job failed"):
        pool.run([bad, lambda: done.append(1)])
    pool.run([lambda: done.append(2), lambda: done.append(3)])
    assert sorted(done) == [1, 2, 3]
    assert torch.get_num_threads() == 2  # the workers' one-thread setting stays theirs


def test_workers_stay_on_one_thread_after_parallel_ops(two_threads):
    """torch sets a thread's OpenMP width lazily on its first parallel op; a worker must not be
    widened back to the default then (its extra OpenMP threads slowed every thread, the caller too)."""
    pool = cpu_threads.pool()
    widths = []

    def job():
        torch.nn.functional.silu(torch.randn(512, 4096))  # big enough for an intra-op parallel loop
        widths.append(torch.get_num_threads())

    pool.run([job, job])
    assert widths == [1, 1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc/self/task")
def test_run_releases_the_callers_idle_openmp_threads(two_threads):
    """After a parallel op the caller's OpenMP helper thread lingers (spin-waiting); run() ends it, and
    the caller's next parallel op starts it again with the same results."""
    assert cpu_threads._omp_pause is not None  # torch's OpenMP runtime is found here
    pool = cpu_threads.pool()
    a = torch.randn(1 << 22)
    threads = lambda: len(os.listdir("/proc/self/task"))  # noqa: E731
    want = torch.add(a, a)
    with_helper = threads()
    pool.run([lambda: None, lambda: None])
    deadline = time.monotonic() + 5
    while threads() >= with_helper and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threads() == with_helper - 1
    assert torch.equal(torch.add(a, a), want) and threads() == with_helper


def test_split_by_load_balances_and_is_deterministic():
    loads = [300, 0, 17, 1, 250, 0, 90, 400]
    groups = cpu_threads.split_by_load(loads, 2)
    assert sorted(i for g in groups for i in g) == list(range(8))
    totals = [sum(loads[i] for i in g) for g in groups]
    assert max(totals) - min(totals) <= max(loads) and totals == [508, 550]
    assert groups == cpu_threads.split_by_load(list(loads), 2)


def test_bf16_eval_same_loss_on_both_paths(tmp_path, tiny_recipe, cli):
    """`moe eval --dtype bfloat16`: bf16 weights and compute, the same loss (to rounding) with the
    threaded path forced on or off, close to the fp32 loss; a bad --dtype is a one-line error."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i}: a b c {i % 7}\n" for i in range(300)))
    run = tmp_path / "run"
    train(TrainArgs(str(tiny_recipe(train={"max_steps": 2, "eval_interval": 2, "ckpt_interval": 2})),
                    [str(corpus)], run, quiet=True))
    losses = {}
    for dtype, mode in (("float32", "off"), ("bfloat16", "off"), ("bfloat16", "on")):
        r = cli("eval", run, corpus, "--dtype", dtype, "--json", env={"MOECLI_EXPERT_THREADS": mode})
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        assert res["dtype"] == dtype
        losses[dtype, mode] = res["loss"]
    assert losses["bfloat16", "on"] == pytest.approx(losses["bfloat16", "off"], rel=1e-3)
    assert losses["bfloat16", "on"] == pytest.approx(losses["float32", "off"], rel=2e-2)
    assert losses["bfloat16", "on"] != losses["float32", "off"]  # it really ran in bf16
    r = cli("eval", run, corpus, "--dtype", "int8")
    assert r.returncode == 2 and r.stderr.strip() == "error: --dtype: one of float32, bfloat16, got 'int8'"


def test_info_shows_the_setting(cli):
    for env, shown in (("auto", "auto"), ("off", "off"), ("ON", "on")):
        r = cli("info", "--json", env={"MOECLI_EXPERT_THREADS": env})
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["expert_threads"] == shown


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threaded_equals_loop_with_biases_and_the_clamped_swiglu(two_threads, dtype, padded):
    """GPT-OSS's experts (biases on gate, up and down; the clamped SwiGLU with a limit the values cross) on the
    threaded path: the output and every gradient, biases' included, equal the loop's to rounding (the backward
    is written out for the clamps), and some values do cross the clamps."""
    torch.manual_seed(0)
    counts = torch.tensor([40, 0, 17, 1, 33])
    ex = X.GroupedExperts(len(counts), 32, 48, bias=True, act="clamped_swiglu", limit=0.5).to(dtype)
    with torch.no_grad():
        for b in ex.biases():
            b.normal_(0, 0.5)
    x = torch.randn(int(counts.sum()), 32, dtype=dtype, requires_grad=True)
    w = torch.rand(len(x), requires_grad=True)
    g = torch.randn_like(x)
    with torch.no_grad():
        a = x[:40] @ ex.w1_EDF[0] + ex.b1_EF[0]
        assert (a > 0.5).any() and (a < 0.5).any()
    X.PAD_ROWS = padded
    out = {}
    for mode in (False, True):
        res = run_experts(ex, x, counts, g, mode, w)
        out[mode] = res + [b.grad for b in ex.biases()]
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    assert len(out[True]) == 9 and all(t is not None for t in out[True])
    for a, b in zip(out[False], out[True]):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    assert out[True][-3][1].abs().max() == 0  # no tokens: zero bias gradient


@pytest.mark.parametrize("kind", ["swiglu", "biases_clamped"])
@pytest.mark.parametrize("autocast", [False, True])
def test_grouped_mm_path_equals_the_loop(kind, autocast):
    """The GPU path (experts.GROUPED_MM: three torch._grouped_mm calls, biases gathered per row) run on the CPU,
    where torch has the op too: output and every gradient equal the loop's to bf16 rounding, with an expert
    that gets no rows; under autocast from fp32 weights too. On CUDA it is chosen by itself (gpu_check.sh)."""
    torch.manual_seed(0)
    counts = torch.tensor([40, 0, 17, 1, 33])
    biased = kind != "swiglu"
    ex = X.GroupedExperts(len(counts), 32, 48, bias=biased, act="clamped_swiglu" if biased else "swiglu", limit=0.5)
    if biased:
        with torch.no_grad():
            for b in ex.biases():
                b.normal_(0, 0.5)
    if not autocast:
        ex = ex.to(torch.bfloat16)
    dtype = torch.float32 if autocast else torch.bfloat16
    x = torch.randn(int(counts.sum()), 32, dtype=dtype, requires_grad=True)
    w = torch.rand(len(x), requires_grad=True)
    g = torch.randn(len(x), 32)
    out = {}
    try:
        for grouped in (False, True):
            X.GROUPED_MM = grouped
            x.grad = w.grad = None
            ex.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                assert (X.use_grouped_mm(x, ex.w1_EDF) is not None) == grouped
                y = ex(x, counts, w)
            assert ex.last_path == ("grouped_mm" if grouped else "loop")
            y.backward(g.to(y.dtype))
            params = [ex.w1_EDF, ex.w3_EDF, ex.w2_EFD, *(ex.biases() if biased else ())]
            out[grouped] = [y.detach(), x.grad, w.grad] + [p.grad for p in params]
    finally:
        X.GROUPED_MM = None
    for a, b in zip(out[False], out[True]):  # to bf16 rounding of the largest value (sums of bf16 terms cancel)
        assert float((b.float() - a.float()).abs().max()) <= 2e-2 * float(a.float().abs().max())
    assert out[True][3][1].abs().max() == 0  # the expert without rows: a zero gradient
    X.GROUPED_MM = None
    assert X.use_grouped_mm(x, ex.w1_EDF) is None  # chosen by itself only on a GPU


@pytest.mark.parametrize("path", ["loop", "threaded", "grouped_mm"])
@pytest.mark.parametrize("biased", [False, True])
def test_train_only_gives_the_chosen_experts_the_full_gradient_and_the_rest_none(path, biased):
    """GroupedExperts.train_only (--train-experts): on every path the output is the plain experts', the trained
    rows' gradients are the plain experts' gradients of those rows, the stored weights get none, and state_dict()
    holds the stored names with the trained rows put in."""
    import copy

    torch.manual_seed(1)
    counts = torch.tensor([9, 0, 14, 5, 11])
    ex = X.GroupedExperts(len(counts), 16, 24, bias=biased)
    if biased:
        with torch.no_grad():
            for b in ex.biases():
                b.normal_(0, 0.5)
    if path == "grouped_mm":
        ex = ex.to(torch.bfloat16)
    dtype = next(ex.parameters()).dtype
    esft = copy.deepcopy(ex)
    esft.train_only([1, 3])
    x = torch.randn(int(counts.sum()), 16, dtype=dtype)
    w = torch.rand(len(x))
    g = torch.randn(len(x), 16, dtype=dtype)
    try:
        X.THREADED, X.GROUPED_MM = path == "threaded", path == "grouped_mm"
        plain = ex(x, counts, w)
        plain.backward(g)
        y = esft(x, counts, w)
        y.backward(g)
        assert esft.last_path == path
    finally:
        X.THREADED = X.GROUPED_MM = None
    torch.testing.assert_close(y, plain.detach(), rtol=0, atol=0)
    for name in esft.weight_names():
        assert getattr(esft, name).grad is None and not getattr(esft, name).requires_grad
        torch.testing.assert_close(getattr(esft, f"trained_{name}").grad, getattr(ex, name).grad[[1, 3]])
    with torch.no_grad():
        esft.trained_w1_EDF.add_(1.0)
    sd = esft.state_dict()
    assert set(sd) == set(ex.state_dict())  # the stored names only
    assert torch.equal(sd["w1_EDF"][[1, 3]], esft.trained_w1_EDF) and torch.equal(sd["w1_EDF"][0], ex.w1_EDF[0])
