# Run with transformers 5 (the main environment): make tiny dense HF models, upcycle them with moecli.
import sys, json, subprocess, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support.hf_models import make, logits  # noqa: E402
root = Path(sys.argv[1]); root.mkdir(parents=True, exist_ok=True)
x = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
for kind in ("llama", "qwen3", "qwen2"):
    d = root / kind
    m = make(kind, d)
    torch.save({"x": x, "logits": logits(m, x)}, root / f"{kind}_ref.pt")
    r = subprocess.run(["moe", "upcycle", str(d), "-o", str(root / f"{kind}_moe"), "-e", "4", "-k", "2", "--shard-size-mb", "0.02", "--json"], capture_output=True, text=True)
    print(kind, r.returncode, json.loads(r.stdout)["format"] if r.returncode == 0 else r.stderr)
