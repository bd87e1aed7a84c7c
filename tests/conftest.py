import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

torch.set_num_threads(min(2, torch.get_num_threads()))


def run_cli(*args, input=None, env=None, timeout=600):
    """Run `python -m moecli.cli ...` in a subprocess; returns CompletedProcess (text)."""
    e = dict(os.environ)
    e.pop("MOE_DEBUG", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "moecli.cli", *map(str, args)], input=input, capture_output=True,
                          text=True, env=e, timeout=timeout, cwd=ROOT)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def tiny_recipe(tmp_path):
    """Write a tiny recipe YAML and return its path; kwargs override sections."""
    import yaml

    def make(name="tiny", **sections):
        data = {
            "name": name,
            "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64, "context": 64},
            "moe": {"num_experts": 4, "top_k": 2, "expert_ffn": 32},
            "train": {"batch_size": 4, "seq_len": 32, "max_steps": 6, "warmup_steps": 2, "eval_interval": 3,
                      "eval_batches": 2, "ckpt_interval": 3},
        }
        for sec, vals in sections.items():
            data.setdefault(sec, {}).update(vals)
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(data))
        return p

    return make
