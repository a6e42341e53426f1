"""What the training loop does besides training, as small hooks it calls.

:class:`StopFlag` turns SIGINT/SIGTERM into a flag the loop checks. The loop sums each dispatch's
metrics into a :class:`MetricsWindow`; on a logging step the window becomes one record (the means
of the metrics since the last record, the learning rate and the speed), which every *sink* gets:
``metrics.jsonl`` (:class:`JsonlSink`), TensorBoard (:class:`TensorBoardSink`) and the progress
bar (:class:`ProgressSink`, which also advances after each dispatch). A sink is any object with
``write(record)``, ``advance(num_steps)`` and ``close()``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time

import jax
import numpy as np

from diffusion_jax import generation, images, outputs, sharding

logger = logging.getLogger("diffusion_jax.training")

# Signals that stop training with a checkpoint (SIGHUP: the terminal or SSH session closed).
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)

# Record fields that are not plotted in TensorBoard (its x axis, and the wall clock).
NOT_PLOTTED = ("step", "time")


class StopFlag:
    """Turns SIGINT/SIGTERM/SIGHUP into a flag the loop checks between dispatches.

    A second signal exits at once (status 128 + its number), saying that nothing more was
    saved: the user asked twice, so waiting for the dispatch and the checkpoint is not wanted.

    With several processes the loop acts on a signal only through :meth:`agree`, which every
    process calls after every dispatch: a checkpoint is a collective operation, so all of them
    must stop at the same step, whichever of them received the signal.
    """

    def __init__(self):
        self.signal = None  # what the loop acts on
        self.received = None
        self._previous = {}

    def __enter__(self):
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None:
            # (os.write and os._exit: safe inside a handler, and no traceback)
            os.write(2, f"\nsignal {signum} received again: exiting now; nothing more was "
                     "saved (resume from the last checkpoint)\n".encode())
            os._exit(128 + signum)
        self.received = signum
        if jax.process_count() == 1:
            self.signal = signum

    def agree(self) -> None:
        """Set ``signal`` if any process has received one (a collective: call on all)."""
        if jax.process_count() > 1:
            signals = sharding.all_processes(self.received or 0)
            if np.any(signals):
                self.signal = int(np.max(signals))

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class MetricsWindow:
    """The metric sums of the dispatches since the last record. They stay on the device until
    :meth:`record` (reading them would wait for each dispatch to finish)."""

    def __init__(self, start: int, learning_rate, batch_size: int, clock=time.perf_counter):
        self.learning_rate, self.batch_size, self.clock = learning_rate, batch_size, clock
        self.pending, self.last_step, self.last_time = [], start, clock()

    def add(self, sums: dict) -> None:
        self.pending.append(sums)

    def record(self, step: int, nonfinite_skipped) -> dict:
        """The record of steps (last record, ``step``]; starts the next window."""
        now = self.clock()
        n = step - self.last_step
        rate = n / (now - self.last_time)
        record = {
            "step": step,
            # (the loss first: jax returns the dict with its keys sorted)
            **{k: float(sum(p[k] for p in self.pending)) / n for k in _ordered(self.pending[0])},
            "lr": float(self.learning_rate(step)),
            "steps_per_sec": rate,
            "images_per_sec": rate * self.batch_size,
            "nonfinite_skipped": int(nonfinite_skipped),
            "time": time.time(),
        }
        self.pending, self.last_step, self.last_time = [], step, now
        return record


def _ordered(names) -> list:
    return sorted(names, key=lambda k: (k != "loss", k))


class JsonlSink:
    """Appends each record to ``path`` as one JSON line. A resumed run first drops the records
    written after its checkpoint by the interrupted run (they are about to be written again)."""

    def __init__(self, path: str, start: int):
        self.path = path
        if os.path.exists(path):
            drop_records_after(path, start)

    def advance(self, num_steps: int) -> None:
        pass

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


def drop_records_after(path: str, step: int) -> None:
    """Keep only the records of steps <= ``step`` in the metrics file ``path``.

    A line that is not a record (bad bytes, a line cut short by a crash) does not block the
    resume; it is dropped, but the file as it was is first kept as ``path + ".bak"`` and a
    warning names both files, so no data the user had is lost silently.
    """
    with open(path, "rb") as f:
        lines = f.readlines()
    keep, damaged = [], 0
    for line in lines:
        try:
            if json.loads(line.decode("utf-8"))["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):  # (UnicodeDecodeError is a ValueError)
            damaged += 1
    if damaged:
        backup, n = path + ".bak", 1
        while os.path.exists(backup):  # an earlier backup is never replaced
            backup, n = f"{path}.bak{n}", n + 1
        with outputs.written(backup) as tmp, open(tmp, "wb") as f:
            f.writelines(lines)
        logger.warning(
            f"{path}: {damaged} line(s) are not JSON records (damaged bytes or a line cut short "
            f"by a crash) and were dropped; the file as it was is kept in {backup}"
        )
    if len(keep) != len(lines):
        with outputs.written(path) as tmp, open(tmp, "wb") as f:
            f.writelines(keep)


def require_tensorboard():
    """The tensorboardX module, or an ImportError that says what to do."""
    try:
        import tensorboardX
    except ImportError as e:
        raise ImportError(
            f"TensorBoard logging needs tensorboardX ({e}); install it with "
            "`pip install tensorboardX` (it is in requirements.txt), or pass --no_tensorboard"
        ) from None
    return tensorboardX


class TensorBoardSink:
    """Scalars in ``logdir`` for TensorBoard (tensorboardX, a declared dependency: it writes
    event files without TensorFlow)."""

    def __init__(self, logdir: str):
        self.writer = require_tensorboard().SummaryWriter(logdir)

    def advance(self, num_steps: int) -> None:
        pass

    def write(self, record: dict) -> None:
        for k, value in record.items():
            if k not in NOT_PLOTTED:
                self.writer.add_scalar(k, value, record["step"])

    def close(self) -> None:
        self.writer.close()


class ProgressSink:
    """A tqdm progress bar showing the last record's loss and images/s."""

    def __init__(self, total: int, initial: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def advance(self, num_steps: int) -> None:
        self.bar.update(num_steps)

    def write(self, record: dict) -> None:
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_sec']:.0f}")

    def close(self) -> None:
        self.bar.close()


def sinks(workdir: str, start: int, total: int, *, progress: bool, tensorboard: bool) -> list:
    """The sinks of a run's main process: metrics.jsonl, TensorBoard and the progress bar."""
    out = []
    try:
        out.append(JsonlSink(os.path.join(workdir, "metrics.jsonl"), start))
        if tensorboard:
            out.append(TensorBoardSink(os.path.join(workdir, "tensorboard")))
        if progress:
            out.append(ProgressSink(total, start))
    except BaseException:
        for sink in out:
            sink.close()
        raise
    return out


def sample_grid_writer(config, model, sample_shape: tuple, mesh):
    """``fn(ema_params, path)`` writing a class-ordered grid of 8 samples per class, sampled over
    the mesh by every process and written by process 0; None for 2-D point data."""
    if len(sample_shape) != 3:
        return None

    def write(ema_params, path):
        labels = np.repeat(np.arange(config.num_classes), 8)
        result = generation.generate(
            config,
            model,
            ema_params,
            sample_shape,
            labels,
            jax.random.PRNGKey(config.seed + 1),
            mesh=mesh,
        )
        samples = sharding.to_host(result.samples)
        if sharding.is_main_process():
            images.save_grid(samples, labels, path, null_label=config.null_label)

    return write
