"""Test-suite settings: run on the CPU whatever accelerator plugins are installed.

Setting the platform before jax is imported also silences the CUDA plugin's start-up traceback on
machines that have jax[cuda12] installed but no GPU.
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
# Commands run as subprocesses must not fill the user's ~/.cache with test programs.
os.environ["DIFFUSION_JAX_COMPILATION_CACHE"] = "off"
# Training keeps its steps_per_dispatch loop on the CPU, so the tests exercise the program that
# GPUs and TPUs run (on its own the CPU takes one straight-line step per dispatch).
os.environ["DIFFUSION_JAX_CPU_STEP_LOOP"] = "1"
# Commands run as subprocesses see the CPU as one device, as the in-process tests do (the
# multi-device paths have tests of their own: test_sharding.py, test_distillation.py).
os.environ["DIFFUSION_JAX_CPU_DEVICES"] = "1"
# Test programs are tiny and compile once: XLA's backend optimisations cost more time (a tiny
# U-Net's init compiles in 15 s with them, 6 s without) than they save.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()
sys.path.insert(0, os.path.dirname(__file__))  # the helpers in tests/ (exact.py, ...)


import pytest  # noqa: E402  (after the platform is forced)

TINY = dict(preset="tiny", progress=False, tensorboard=False)


@pytest.fixture(scope="session")
def tiny_data():
    """mnist5k at 8x8, as the tiny preset loads it."""
    from diffusion_jax import datasets
    from diffusion_jax.config import get_config

    return datasets.load_dataset(get_config("tiny"))


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory, tiny_data):
    """A finished 8-step run of the tiny preset: (workdir, TrainResult). Shared by modules so
    the train step compiles once per session."""
    from diffusion_jax import training

    workdir = str(tmp_path_factory.mktemp("straight"))
    return workdir, training.train(workdir, dataset=tiny_data, **TINY)


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory, tiny_data):
    """A one-epoch classifier of tiny_data, cached in a folder as evaluate.py caches one."""
    from diffusion_jax import classifier

    directory = str(tmp_path_factory.mktemp("clf"))
    clf = classifier.train_classifier(tiny_data, epochs=1, feature_dim=8)
    classifier.save(clf, directory, tiny_data.name)
    return directory

