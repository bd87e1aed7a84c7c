"""Helpers the tests share (not tests): tiny transformers checkpoints and parity checks (hf_models), functions
run inside spawned ranks (dist_workers), the repository's paths (paths)."""
