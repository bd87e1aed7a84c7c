"""moecli: a command-line Mixture-of-Experts toolkit."""

import os

# Same seed, same numbers: MKL (torch's fp32 BLAS here) may pick its thread count per call at run time
# (MKL_DYNAMIC) and round differently with buffer alignment; either changes a product's last bits. Measured
# with `MOECLI_EXPERT_THREADS=off moe train mixtral --set model.d_model=512 --set moe.expert_ffn=1024
# --max-steps 30`: left alone, 2 different final losses in 5 runs (differing from step 1's grad norm on);
# with only MKL_CBWR=AUTO,STRICT, 1 run of 8 differed; with both settings below, 8 of 8 were equal, at the
# same tokens/s.
# They must be set before torch loads MKL, so here; values the user set are kept.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
# Tensors of 2 MiB and more on transparent huge pages (torch's own switch, read when it first allocates): a
# training step's activations and gradients are GBs of memory touched anew, and each 4 KiB page is a fault.
# Measured at 692M parameters (benchmarks/train_real_shape.py): 101.6 tokens/s with it, 80.6 without, peak RSS
# 12.96 vs 12.80 GiB. Where the kernel's THP setting is "never" it does nothing.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
