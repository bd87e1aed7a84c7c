"""--device: names resolved or refused in one line; several processes one GPU each; results report it.

No GPU is lent to these tests: what runs here is the CPU path and the checks; a GPU's own run is not
tested (README, "Known limits")."""

import json

import pytest
import torch

from moecli.parallel.device import resolve_device
from moecli.errors import UserError
from moecli.training.setup import TrainArgs, setup


def test_device_names():
    assert resolve_device("cpu") == resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:x", "cuda:", "mps", ""):
        with pytest.raises(UserError, match=r"--device: expected cpu, cuda, cuda:N or auto"):
            resolve_device(bad)


def test_gpu_names_follow_what_torch_sees(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"--device cuda: torch sees no CUDA GPU here .*use --device cpu"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(UserError, match=r"--device cuda:1: torch sees 1 CUDA GPU\(s\), numbered from 0"):
        resolve_device("cuda:1")


def test_several_processes_take_one_gpu_each(tmp_path, tiny_recipe, monkeypatch):
    """--nproc N --device cuda: one GPU per rank by LOCAL_RANK; a GPU named by index, or fewer GPUs than local
    ranks, is refused in one line before anything starts."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert setup(TrainArgs(str(tiny_recipe()), [], tmp_path / "run", nproc=2, device="cuda")).device.type == "cuda"
    with pytest.raises(UserError, match=r"--device cuda: 3 processes on this machine need a GPU each; torch sees 2"):
        setup(TrainArgs(str(tiny_recipe()), [], tmp_path / "run", nproc=3, device="cuda"))
    with pytest.raises(UserError, match=r"--device cuda:1: several processes .* take one GPU each"):
        setup(TrainArgs(str(tiny_recipe()), [], tmp_path / "run", nproc=2, device="cuda:1"))
    monkeypatch.setenv("WORLD_SIZE", "4")  # under torchrun, two nodes of two
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert setup(TrainArgs(str(tiny_recipe()), [], tmp_path / "run", device="auto")).device.type == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where torch sees no GPU")
def test_cli_refuses_a_gpu_it_does_not_have(tmp_path, tiny_recipe, cli):
    ckpt = tmp_path / "ckpt"
    assert cli("build", tiny_recipe(), "-o", ckpt).returncode == 0
    for args in (("train", tiny_recipe(), "-o", tmp_path / "run"), ("eval", ckpt), ("generate", ckpt, "-p", "x"),
                 ("inspect-routing", ckpt, "-")):
        r = cli(*args, "--device", "cuda", input="some text " * 20)
        assert r.returncode == 2 and r.stderr.startswith("error: --device cuda: torch sees no CUDA GPU"), r.stderr
        assert r.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()  # refused before anything was written
    r = cli("eval", ckpt, "-", "--device", "auto", "--json", input="some text " * 20)
    assert r.returncode == 0 and json.loads(r.stdout)["device"] == "cpu"
