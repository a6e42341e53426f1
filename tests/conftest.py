"""Test-suite settings: run on the CPU whatever accelerator plugins are installed.

Setting the platform before jax is imported also silences the CUDA plugin's start-up traceback on
machines that have jax[cuda12] installed but no GPU.
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
sys.path.insert(0, os.path.dirname(__file__))  # the helpers in tests/ (exact.py, ...)
