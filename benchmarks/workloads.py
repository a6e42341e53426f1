"""What the benchmarks run: configurations named on the command line, synthetic data sets and a
train step ready to call."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """A named configuration: a preset and config-field overrides."""

    name: str
    preset: str
    overrides: dict

    @classmethod
    def parse(cls, text: str, default_preset: str) -> RunSpec:
        """'NAME: key=value key=value' (tuples comma-separated; preset=P picks the preset)."""
        from diffusion_jax import config as config_lib

        name, _, rest = text.partition(":")
        name = name.strip()
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"--run {text!r}: the name must be letters, digits, - or _")
        parser = argparse.ArgumentParser(prog=f"--run {name}", add_help=False)
        config_lib.add_config_flags(parser)
        flags = []
        for item in rest.split():
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"--run {text!r}: {item!r} is not key=value")
            flags += [f"--{key}", value]
        try:
            args = parser.parse_args(flags)
        except SystemExit:
            raise ValueError(f"--run {text!r}: unknown field or bad value") from None
        preset = args.preset or default_preset
        overrides = config_lib.config_overrides(args)
        config_lib.get_config(preset, **overrides)  # validate now, not after an hour of training
        return cls(name, preset, overrides)

    def describe_overrides(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.overrides.items()) or "(none)"


def data_shape(config) -> tuple[int, ...]:
    """Shape of one example as the data loader would give it (without batch)."""
    from diffusion_jax import datasets

    if datasets.get(config.dataset).kind == "points":  # toy2d, the one data set of points
        return (2,)
    size = config.image_size or 28  # MNIST, Fashion-MNIST and the 5k digits are 28x28x1
    return (size, size, 1)


def synthetic_dataset(num_classes: int, num: int, shape=(28, 28, 1), seed: int = 0):
    """A Dataset of ``num`` uniform random examples in [-1, 1] of ``shape`` with random labels and
    no test split: the speed of a step does not depend on what the images show."""
    from diffusion_jax import data

    rng = np.random.default_rng(seed)
    return data.Dataset(
        "synthetic",
        rng.uniform(-1, 1, (num, *shape)).astype(np.float32),
        rng.integers(0, num_classes, num).astype(np.int32),
        np.zeros((0, *shape), np.float32),
        np.zeros((0,), np.int32),
        num_classes,
    )


def train_program(config, dataset, mesh=None, num_shards: int = 1):
    """``(steps_fn, state, train_x, train_y)`` laid out as :func:`diffusion_jax.training.train`
    lays them out (``mesh`` defaults to all devices): ``steps_fn(state, train_x, train_y, count)``
    takes ``count`` optimizer steps and returns ``(state, metric_sums)``."""
    from diffusion_jax import models, sharding, training

    mesh = sharding.data_mesh() if mesh is None else mesh
    model = models.build_model(config)
    state = training.init_state(config, model, (1, *dataset.train_x.shape[1:]))
    train_x, train_y = training.device_data(dataset, mesh, num_shards)
    steps_fn = training.make_train_steps(config, mesh, num_shards)
    return steps_fn, sharding.replicate(state, mesh), train_x, train_y


def threaded(step, state, *rest):
    """A zero-argument runner of ``step(state, *rest) -> (state, outputs)`` returning
    ``outputs``, each call fed the state the previous one returned: the train step donates its
    input state, so the same state cannot be passed twice (each call does the same work)."""
    box = [state]

    def run():
        box[0], outputs = step(box[0], *rest)
        return outputs

    return run


def step_runner(config, dataset):
    """``(run, num_params)``: ``run()`` takes one optimizer step of ``config`` on ``dataset``
    (as :func:`diffusion_jax.training.train` does) and returns its loss once it is computed."""
    import jax

    step_fn, state, train_x, train_y = train_program(config, dataset)
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    step = threaded(step_fn, state, train_x, train_y, 1)

    def run() -> float:
        return float(jax.block_until_ready(step()["loss"]))

    return run, num_params
