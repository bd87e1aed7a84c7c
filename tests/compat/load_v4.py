# Run with transformers 4.x: load the upcycled MoE directories and compare with the dense logits.
import torch, transformers
from pathlib import Path
print("transformers", transformers.__version__)
import sys
root = Path(sys.argv[1])
for kind in ("llama", "qwen3", "qwen2"):
    ref = torch.load(root / f"{kind}_ref.pt", weights_only=True)
    m = transformers.AutoModelForCausalLM.from_pretrained(root / f"{kind}_moe").eval()
    with torch.no_grad():
        diff = (m(ref["x"]).logits - ref["logits"]).abs().max().item()
    print(kind, type(m).__name__, "max |logit diff| vs dense:", diff)
