#!/usr/bin/env bash
# Manual compatibility check (not part of the default suite): moecli's Hugging Face MoE outputs load in
# transformers 4.x with the dense model's logits. Makes tiny dense models and upcycles them with the current
# environment (transformers 5.x), then loads the results in a throwaway venv with transformers<5.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
python3 "$here/make_and_upcycle.py" "$work/models"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q torch==2.13.0
"$work/venv/bin/pip" install -q "transformers<5" safetensors
"$work/venv/bin/python" "$here/load_v4.py" "$work/models"
