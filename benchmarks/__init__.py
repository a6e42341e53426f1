"""Benchmarks of diffusion_jax, a package so that the scripts share their helpers.

Each script runs from the repository root as ``python benchmarks/NAME.py`` or
``python -m benchmarks.NAME``:

- ``benchmark.py``: training and sampling throughput, FLOPs, compile times (the main report);
  its sections live in ``training_bench.py``, ``sampling_bench.py`` and ``sampling_programs.py``.
- ``quality_vs_time.py``, ``profile_step.py``, ``torch_peer.py``, ``bf16_loss_curves.py``:
  studies of one question each (see their docstrings).
- ``common.py``: report header, markdown tables, timing, FLOPs and device peaks;
  ``workloads.py``: configurations named on the command line, synthetic data, a train step.
"""
