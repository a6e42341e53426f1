"""The benchmark scripts: each starts both ways (as a file and as a module); the quality-against-
time harness's run specifications are parsed and validated up front."""

import os
import subprocess
import types
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `benchmarks` is a folder of the repository, not an installed package

from benchmarks.workloads import RunSpec  # noqa: E402

SCRIPTS = ("benchmark", "quality_vs_time", "profile_step", "torch_peer", "bf16_loss_curves")


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_start_as_files_and_as_modules(script, tmp_path):
    """``python benchmarks/X.py`` puts benchmarks/ on sys.path, ``-m benchmarks.X`` the current
    folder: the imports of the shared modules must work both ways, from any folder."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    as_file = [sys.executable, os.path.join(ROOT, "benchmarks", f"{script}.py"), "--help"]
    as_module = [sys.executable, "-m", f"benchmarks.{script}", "--help"]
    for cmd, cwd in ((as_file, tmp_path), (as_module, ROOT)):
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("usage:")


def test_run_spec_parses_fields_tuples_and_preset():
    spec = RunSpec.parse("p2: patch_size=2 channel_mults=1,2 lr=3e-4 preset=tiny", "cpu")
    assert spec == RunSpec("p2", "tiny", {"patch_size": 2, "channel_mults": (1, 2), "lr": 3e-4})
    assert RunSpec.parse("base", "cpu") == RunSpec("base", "cpu", {})


@pytest.mark.parametrize(
    "text, match",
    [
        ("bad name: lr=1", "name must be"),
        ("x: lr", "not key=value"),
        ("x: learning_rate=1", "unknown field"),
        ("x: lr=fast", "unknown field or bad value"),
        ("x: weighting=min_snr prediction=mean", "min_snr"),  # Config.validate, before training
        ("x: patch_size=0", "patch_size"),
    ],
)
def test_run_spec_rejects_bad_input(text, match):
    with pytest.raises(ValueError, match=match):
        RunSpec.parse(text, "cpu")


def test_sections_run_in_the_order_given(monkeypatch):
    """--sections sample,train runs sampling first (it used to run in a fixed order)."""
    from benchmarks import benchmark

    ran = []
    monkeypatch.setattr(benchmark, "make_sampling", lambda p, d: None)
    monkeypatch.setattr(benchmark, "train_section", lambda *a: ran.append("train"))
    monkeypatch.setattr(benchmark, "sampling_section", lambda *a: ran.append("sample"))
    argv = ["--presets", "tiny", "--sections", "sample,train", "--out", "-"]
    assert benchmark.main(argv) == 0
    assert ran == ["sample", "train"]


def test_training_rows_are_printed_as_they_finish(monkeypatch, capsys):
    """Each training row is printed when its benchmark ends, before the next one starts (the
    H200 run printed no row in 120 s: tables came only after a whole section)."""
    from benchmarks import training_bench
    from benchmarks.common import Report

    seen = []

    def fake_bench(preset, dtype, batch, *a):
        seen.append(capsys.readouterr().out)  # what was printed before this benchmark started
        return dict(preset=preset, dtype=dtype, batch=batch)

    monkeypatch.setattr(training_bench, "bench_train", fake_bench)
    monkeypatch.setattr(training_bench, "train_row", lambda r, *a: [r["batch"]] + [""] * 12)
    monkeypatch.setattr(training_bench, "ratio_table", lambda results: "")
    args = types.SimpleNamespace(
        num_examples=8, presets=["tiny"], dtypes=["float32"], peak_tflops=None,
        train_batch_sizes=[16, 32],
    )
    training_bench.train_section(args, Report())
    assert "| 16 |" in seen[1] and "| 32 |" not in seen[1]
