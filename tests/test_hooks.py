"""The training loop's hooks on their own: the metrics window's means, metrics.jsonl on resume,
the TensorBoard event files (read back with the protobuf schema, not through the writer)."""

import json
import os
import struct

import numpy as np
import pytest

from diffusion_jax import hooks


def test_a_record_holds_the_means_of_the_window_and_starts_the_next():
    window = hooks.MetricsWindow(start=10, learning_rate=lambda step: 1e-3 * step, batch_size=4)
    # (key order as jax returns a dict: sorted)
    window.add({"grad_norm": np.float32(3.0), "loss": np.float32(6.0)})  # 3 steps' sums
    window.add({"grad_norm": np.float32(1.0), "loss": np.float32(2.0)})  # 1 step's sums
    record = window.record(14, nonfinite_skipped=0)
    assert list(record)[:3] == ["step", "loss", "grad_norm"]  # the order metrics.jsonl had
    assert record["step"] == 14 and record["loss"] == 2.0 and record["grad_norm"] == 1.0
    assert record["lr"] == pytest.approx(0.014)
    assert record["images_per_sec"] == pytest.approx(4 * record["steps_per_sec"])
    assert record["nonfinite_skipped"] == 0
    window.add({"loss": np.float32(1.0), "grad_norm": np.float32(5.0)})
    assert window.record(16, nonfinite_skipped=2)["loss"] == 0.5  # (16 - 14 steps)


def test_the_speed_is_steps_over_the_seconds_since_the_last_record():
    times = iter([100.0, 102.0, 103.0])
    window = hooks.MetricsWindow(10, lambda step: 0.0, batch_size=8, clock=lambda: next(times))
    window.add({"loss": 1.0})
    first = window.record(14, 0)  # 4 steps in 2 s
    assert first["steps_per_sec"] == 2.0 and first["images_per_sec"] == 16.0
    window.add({"loss": 1.0})
    assert window.record(17, 0)["steps_per_sec"] == 3.0  # 3 steps in 1 s


def test_a_new_metric_reaches_every_record():
    window = hooks.MetricsWindow(0, lambda step: 0.0, 1)
    window.add({"loss": 1.0, "grad_norm": 1.0, "snr": 8.0})
    assert window.record(2, 0)["snr"] == 4.0


def test_resuming_drops_the_records_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (2, 4, 6)] + ['{"step": 8, "lo']
    path.write_text("\n".join(lines) + "\n")
    sink = hooks.JsonlSink(str(path), start=4)
    sink.write({"step": 6, "loss": 0.5})
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == [2, 4, 6]


def read_scalars(logdir) -> dict:
    """{tag: [(step, value)]} from the event files: length-prefixed Event protos."""
    from tensorboardX.proto import event_pb2

    out = {}
    for name in os.listdir(logdir):
        data, i = open(os.path.join(logdir, name), "rb").read(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4  # length, its CRC, the event, its CRC
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_tensorboard_gets_every_field_of_each_record_but_step_and_time(tmp_path):
    sink = hooks.TensorBoardSink(str(tmp_path))
    for step, loss in ((2, 0.5), (4, 0.25)):
        sink.write(
            {
                "step": step,
                "loss": loss,
                "grad_norm": 1.0,
                "lr": 0.1,
                "steps_per_sec": 3.0,
                "time": 123.0,
            }
        )
    sink.close()
    scalars = read_scalars(tmp_path)
    assert sorted(scalars) == ["grad_norm", "loss", "lr", "steps_per_sec"]  # not step, time
    assert scalars["loss"] == [(2, 0.5), (4, 0.25)]


def test_sinks_made_before_a_failing_one_are_closed(tmp_path, monkeypatch):
    closed = []

    class Recorder(hooks.JsonlSink):
        def close(self):
            closed.append(self.path)

    def broken(total, initial):
        raise RuntimeError("no terminal")

    monkeypatch.setattr(hooks, "JsonlSink", Recorder)
    monkeypatch.setattr(hooks, "ProgressSink", broken)
    with pytest.raises(RuntimeError, match="no terminal"):
        hooks.sinks(str(tmp_path), 0, 10, progress=True, tensorboard=False)
    assert closed == [str(tmp_path / "metrics.jsonl")]
