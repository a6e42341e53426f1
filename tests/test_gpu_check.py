"""benchmarks/gpu_check.py dry-run on the CPU (tiny preset, tiny budgets), the mnist5k IDX export
it trains on, and the readers of the stages' outputs."""

import json
import os
import re
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `benchmarks` and `tools` are folders of the repository

from benchmarks import gpu_check  # noqa: E402
from benchmarks.gpu_check_report import (  # noqa: E402
    bench_result,
    evaluation_numbers,
    table_rows,
)


def test_export_reads_back_as_mnist5k_and_dry_run_writes_the_report(tmp_path):
    """The whole check as the lent machine runs it, on the CPU: data from the IDX export, every
    stage, the benchmark cut off by its budget. The report must hold each section's numbers."""
    from diffusion_jax import datasets
    from tools import export_mnist5k

    folder = tmp_path / "gpu_data"
    export_mnist5k.export(str(folder))  # (checks the read-back itself; checked again here)
    back, ref = datasets.load_idx_folder(str(folder)), datasets.load_mnist5k()
    assert back.train_x.shape == (4500, 28, 28, 1) and np.array_equal(back.train_x, ref.train_x)
    assert np.array_equal(back.test_y, ref.test_y)

    out = tmp_path / "out"
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--data_dir", str(folder), "--out", str(out),
           "--scratch", str(tmp_path / "scratch"), "--preset", "tiny", "--per_class", "2",
           "--budget", "240", "--budgets", "bench=3,train=15",
           # the tiny preset's 8 steps would end the runs before SIGTERM does
           "--train_args=--num_steps 100000", "--eval_args=--classifier_epochs 1"]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # (conftest: XLA at opt level 0, cache off)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"^\[train_cold +[\d.]+s\] training unet on idx:gpu_data", done.stdout, re.M)

    report = (out / "report.md").read_text()
    for heading in ("## Stages", "## Environment", "## Benchmark", "## Start times of train.py",
                    "## Timed training run", "## Sampling", "## Evaluation"):  # fmt: skip
        assert heading in report, heading
    stages = json.loads((out / "report.json").read_text())["stages"]
    assert stages["env"]["info"]["backend"] == "cpu"
    assert stages["env"]["info"]["diffusion_jax"] == os.path.join(ROOT, "diffusion_jax")
    assert stages["bench"]["status"].startswith("timed out")  # SIGINT at 3 s, went on
    for name in ("train_cold", "train_warm"):
        s = stages[name]
        assert s["status"] == "stopped as planned" and s["rc"] == 130, s
        assert 0 < s["loop_start_s"] < s["first_record_s"] < s["wall_s"]
        assert s["first_record_step"] == 1 and s["checkpoint"] == "checkpoint written"
        assert 0 < s["exit_after_signal_s"] < gpu_check.GRACE_S
    t = stages["train"]
    assert t["status"] == "stopped as planned" and t["checkpoint"] == "checkpoint written"
    assert t["steps"] >= t["first_record_step"] >= 2 and t["steps_per_s"] > 0 and t["loss"] > 0
    assert (out / "metrics.jsonl").exists()
    for name in ("sample_cold", "sample_warm"):
        s = stages[name]
        assert s["status"] == "ok" and s["samples"] == 20 and s["device"] == "cpu (cpu)", s
        assert s["compile_s"] > 0 and s["sampling_s"] > 0 and s["npz"].endswith(".npz")
    e = stages["evaluate"]
    assert e["status"] == "ok" and e["n"] == 20 and 0 <= e["accuracy"] <= 1 and e["fd"] > 0
    assert 0 < e["classifier_accuracy"] <= 1
    # the parsed numbers are the ones in the report's tables
    assert f"| cold | {stages['train_cold']['loop_start_s']:.1f} |" in report
    assert f"| {e['n']} | {e['accuracy']:.3f} | {e['fd']:.3g} |" in report
    assert f"{stages['sample_warm']['compile_s']:.2f}" in report
    for log in ("env", "bench", "train_cold", "train_warm", "train", "sample_cold", "evaluate"):
        assert (out / "logs" / f"{log}.log").read_text().startswith("$ ")


def test_skipped_and_unrun_stages_are_named(tmp_path):
    """--skip, and a budget too small for anything: the report still has every stage's row."""
    out = tmp_path / "out"
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--out", str(out), "--budget", "1",
           "--skip", "bench,evaluate", "--scratch", str(tmp_path / "s")]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    stages = json.loads((out / "report.json").read_text())["stages"]
    assert stages["bench"]["status"] == "skipped (--skip)"
    assert stages["train"]["status"] == "skipped (no time left in --budget)"
    assert stages["sample_cold"]["status"].startswith("skipped (no checkpoint")
    assert stages["evaluate"]["status"].startswith("skipped")
    assert "| train_cold | 75 | n/a | skipped (no time left in --budget) |" in (
        out / "report.md"
    ).read_text()


def test_bad_flags_are_usage_errors(tmp_path):
    for flags, says in ((["--skip", "nope"], "--skip: unknown"),
                        (["--budgets", "train"], "--budgets takes STAGE=SECONDS"),
                        (["--data_dir", str(tmp_path / "none")], "export_mnist5k.py")):  # fmt: skip
        done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out",
                               str(tmp_path / "o"), *flags], cwd=ROOT, capture_output=True,
                              text=True)  # fmt: skip
        assert done.returncode == 2 and says in done.stderr, done.stderr


def test_readers_of_outputs():
    text = "# t\n\n| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |\n\n| c |\n|---|\n| 5 |\n"
    assert table_rows(text) == 3
    lines = ["classifier trained and saved to /c/idx:gpu_data-r2: test accuracy 0.9860",
             "{", ' "n": 20,', ' "fd": 2.0,', ' "class_counts": [', "  1", " ],",
             ' "floor_fd": 0.5', "}"]  # fmt: skip
    proc = gpu_check.Proc(0, 1.0, [(0.0, x) for x in lines], None, None, False, 0.0)
    assert evaluation_numbers(proc) == {
        "classifier_accuracy": 0.986, "n": 20, "fd": 2.0, "floor_fd": 0.5, "fd_over_floor": 4.0
    }


def test_bench_result_falls_back_on_printed_tables(tmp_path):
    """A benchmark killed before writing its file still reports the rows it printed."""
    printed = ["Traceback...", "| preset | batch |", "|---|---|", "| mnist | 128 |", "Interrupted"]
    res = bench_result(str(tmp_path / "bench.md"), printed)
    assert res["rows"] == 1 and res["markdown"] == "\n".join(printed[1:4])
    assert bench_result(str(tmp_path / "bench.md"), ["Traceback..."]) == {}
    (tmp_path / "bench.md").write_text("# b\n\n| a |\n|---|\n| 1 |\n| 2 |\n")
    assert bench_result(str(tmp_path / "bench.md"), printed)["rows"] == 2


def test_a_stage_that_ignores_its_stop_signal_is_killed(tmp_path, monkeypatch):
    """Overrun -> stop signal -> SIGKILL after the grace period, and the output up to then kept."""
    monkeypatch.setattr(gpu_check, "GRACE_S", 0.5)
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up'); " \
           "time.sleep(60)"  # fmt: skip
    p = gpu_check.run_process([sys.executable, "-c", code], dict(os.environ),
                              str(tmp_path / "x.log"), 1.0)  # fmt: skip
    assert p.killed and p.reason == "limit" and p.wall_s < 10 and p.rc == -9
    assert gpu_check.status_of(p) == "timed out, killed after the grace period"
    assert p.find("^up$")[0] is not None and "exit code -9" in (tmp_path / "x.log").read_text()
