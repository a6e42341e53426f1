"""A training run resolved from its workdir and the request: which config (fresh, or the saved one
with overrides), which data, which step to resume from, and where this invocation stops.

:func:`resolve_run` does every check that can fail before training starts (a config conflict, a
batch larger than the data, a mesh the batch cannot be split over), so :func:`training.train`'s
loop receives one :class:`Run` and nothing more.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax

from diffusion_jax import checkpoints, data, datasets, models, sharding
from diffusion_jax import config as config_lib
from diffusion_jax import workdir as workdir_lib


class ConfigConflictError(ValueError):
    """A workdir's saved config differs from the requested one."""


@dataclasses.dataclass(frozen=True)
class Run:
    workdir: str  # absolute
    config: config_lib.Config
    dataset: data.Dataset
    mesh: object  # jax.sharding.Mesh of the data-parallel devices
    num_shards: int  # data shards (see training.device_data)
    saved_step: int | None  # the checkpoint to resume from, None for a new run
    end: int  # the step this invocation stops at: num_steps, or stop_after if sooner
    is_main: bool  # process 0: the one that writes logs, metrics and grids

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.workdir, checkpoints.SUBDIR)

    @property
    def stops_early(self) -> bool:
        """This invocation ends (as if interrupted) before ``num_steps``."""
        return self.end < self.config.num_steps


def resolve_config(saved, preset, overrides, allow_config_change=False) -> config_lib.Config:
    """The config of a run: a fresh one from ``preset`` + ``overrides``, or, when resuming, the
    ``saved`` one with ``overrides`` applied. A change of a field that alters the training
    mathematics raises ConfigConflictError unless ``allow_config_change``."""
    if saved is None:
        return config_lib.get_config(preset or "mnist", **overrides)
    if preset is not None:
        requested = config_lib.get_config(preset, **overrides)
    else:
        requested = dataclasses.replace(saved, **overrides).validate()
    diffs = config_lib.differences(saved, requested)
    if diffs and not allow_config_change:
        lines = "\n".join(f"  {k}: saved {a!r}, requested {b!r}" for k, (a, b) in diffs.items())
        raise ConfigConflictError(
            f"the workdir's saved config differs from the requested one:\n{lines}\n"
            "Resume without these flags, use a new --workdir, or pass --allow_config_change "
            "to continue with the new values."
        )
    return requested


DATA_RECORD = workdir_lib.DATA_RECORD


def check_same_data(workdir: str, dataset: data.Dataset, resuming: bool, allow: bool) -> None:
    """Record the training data's fingerprint in ``workdir/data.json`` (a new run, a run made
    before the record existed, or an allowed change), or ConfigConflictError if a resumed run's
    data differ from the recorded ones: the files in --data_dir replaced, say, which nothing
    else would notice. Process 0 decides and writes; every process learns the outcome."""
    path = os.path.join(workdir, DATA_RECORD)
    now = {"dataset": dataset.name, "train_examples": int(dataset.train_x.shape[0])}
    now["sha256"] = data.fingerprint(dataset)
    recorded = None
    if resuming and sharding.is_main_process():
        try:
            with open(path) as f:
                recorded = json.load(f)
        except (OSError, ValueError):
            recorded = None  # a run from before the record: start recording now
    differs = isinstance(recorded, dict) and recorded.get("sha256") != now["sha256"]
    if sharding.same_on_all_processes(differs):
        was = recorded or {}
        change = (
            f"the training data differ from those this run was trained on ({path}: "
            f"{was.get('dataset')!r}, {was.get('train_examples')} examples, SHA-256 "
            f"{str(was.get('sha256'))[:12]}...; now {now['dataset']!r}, {now['train_examples']} "
            f"examples, SHA-256 {now['sha256'][:12]}...)"
        )
        if not allow:
            raise ConfigConflictError(
                f"{change}: were the files in --data_dir replaced? Restore the original data, "
                "train in a new --workdir, or pass --allow_config_change to continue on the new "
                "data."
            )
        # allowed (the flag also extends runs, so the change is never silent)
        logging.getLogger(__name__).warning("%s; continuing on the new data", change)
    if sharding.is_main_process() and recorded != now:
        os.makedirs(workdir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(now, f, indent=1)
        os.replace(path + ".tmp", path)  # never a half-written record


def _reshaping_fields() -> set[str]:
    """The config fields that may change a network's parameters: the model and data sections."""
    return set(config_lib.sections()["model"] + config_lib.sections()["data"])


def check_same_network(saved, saved_shape, config, data_shape) -> None:
    """ConfigConflictError if the network of ``config`` on examples of ``data_shape`` has other
    parameters (names or shapes) than the ``saved`` one on ``saved_shape``: its checkpoint could
    not be restored into it, whatever --allow_config_change says. Only called when a model or
    data field changed (tracing both networks' shapes costs a second or two)."""
    def shapes(cfg, shape):
        params = models.abstract_params(models.build_model(cfg), (1, *shape))
        leaves = jax.tree_util.tree_leaves_with_path(params)
        return {jax.tree_util.keystr(path): x.shape for path, x in leaves}

    before, after = shapes(saved, tuple(saved_shape)), shapes(config, tuple(data_shape))
    if before == after:
        return
    example = min(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    fields = [
        f"{k}: saved {a!r}, requested {b!r}"
        for k, (a, b) in config_lib.differences(saved, config).items()
        if k in _reshaping_fields()
    ]
    raise ConfigConflictError(
        "the workdir's checkpoint (and its config.json) was written for a different network: "
        f"{'; '.join(fields) or 'the data shape'} changes its parameters (e.g. {example}: "
        f"saved {before.get(example, 'absent')}, now {after.get(example, 'absent')}), so it "
        "cannot be resumed even with --allow_config_change. Resume with the network flags it "
        "was trained with (or none of them), or train the new network in a new --workdir."
    )


def _saved(ckpt_dir: str):
    """``(saved config, step, data shape)`` of the workdir's latest checkpoint, or
    ``(None, None, None)``. Process 0's view, so that every process restores the same step or
    none."""
    if not sharding.same_on_all_processes(os.path.isdir(ckpt_dir)):
        return None, None, None
    mngr = checkpoints.manager(ckpt_dir)
    try:
        latest = mngr.latest_step()
        step = sharding.same_on_all_processes(-1 if latest is None else latest)
        if step < 0:
            return None, None, None
        saved, shape = checkpoints.read_meta(mngr, ckpt_dir, step)
        return saved, step, shape
    finally:
        mngr.close()


def resolve_run(
    workdir: str,
    *,
    preset: str | None,
    overrides: dict,
    allow_config_change: bool,
    dataset: data.Dataset | None,
    stop_after: int | None,
    num_shards: int,
) -> Run:
    """The :class:`Run` of ``workdir`` (see :func:`training.train` for the arguments)."""
    workdir = os.path.abspath(workdir)
    ckpt_dir = os.path.join(workdir, checkpoints.SUBDIR)
    saved, saved_step, saved_shape = _saved(ckpt_dir)
    config = resolve_config(saved, preset, overrides, allow_config_change)
    if dataset is None:
        dataset = datasets.load_dataset(config)
    if saved is not None and (
        set(config_lib.differences(saved, config)) & _reshaping_fields()
        or tuple(saved_shape) != dataset.train_x.shape[1:]
    ):
        check_same_network(saved, saved_shape, config, dataset.train_x.shape[1:])
    mesh = sharding.data_mesh()
    sharding.check_batch_size(config.batch_size, mesh)
    sharding.check_num_shards(num_shards, mesh)
    if config.batch_size > dataset.train_x.shape[0] // num_shards * num_shards:
        raise ValueError(
            f"batch_size {config.batch_size} exceeds the {dataset.train_x.shape[0]} training "
            f"examples of {dataset.name}"
            + (f" (in {num_shards} equal shards)" if num_shards > 1 else "")
        )
    check_same_data(workdir, dataset, saved is not None, allow_config_change)
    end = config.num_steps if stop_after is None else min(config.num_steps, stop_after)
    return Run(
        workdir=workdir,
        config=config,
        dataset=dataset,
        mesh=mesh,
        num_shards=num_shards,
        saved_step=saved_step,
        end=end,
        is_main=sharding.is_main_process(),
    )
