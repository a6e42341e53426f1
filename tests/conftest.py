"""Test-suite settings: run on the CPU whatever accelerator plugins are installed.

Setting the platform before jax is imported also silences the CUDA plugin's start-up traceback on
machines that have jax[cuda12] installed but no GPU.
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
# Test programs are tiny and compile once: XLA's backend optimisations cost more time (a tiny
# U-Net's init compiles in 15 s with them, 6 s without) than they save.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()
sys.path.insert(0, os.path.dirname(__file__))  # the helpers in tests/ (exact.py, ...)
