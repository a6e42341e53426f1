"""A distilled student through the commands: distill.py on the tiny preset's run, then sample.py
(a round picked by --steps, a morph), evaluate.py (FD against steps) on the run's folder and
benchmarks/solver_sweep.py --students (each student against the teacher's reference)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from benchmarks import solver_sweep
from diffusion_jax import classifier, datasets, evaluation, generation, plans
from diffusion_jax.commands import distill as distill_script
from diffusion_jax.commands import evaluate as evaluate_script
from diffusion_jax.commands import sample as sample_script


@pytest.fixture(scope="module")
def distilled(straight_run, tmp_path_factory):
    """The tiny run distilled 4 -> 2 -> 1 steps, two optimiser steps a round."""
    out = str(tmp_path_factory.mktemp("distilled") / "run")
    argv = ["--teacher", straight_run[0], "--workdir", out, "--start_steps", "4", "--rounds",
            "2", "--steps_per_round", "2", "--batch_size", "8", "--student_prediction", "v"]
    assert distill_script.main(argv) == 0
    return out


def test_sample_py_picks_the_round_by_steps(distilled, tmp_path):
    out = str(tmp_path / "s")
    argv = ["--workdir", distilled, "--steps", "2", "--per_class", "1", "--out", out]
    assert sample_script.main(argv) == 0
    names = sorted(os.listdir(out))
    assert [n.split("_", 1)[1] for n in names] == [
        "distilled2_w1_seed0_grid.png", "distilled2_w1_seed0_reverse.gif",
        "distilled2_w1_seed0_samples.npz",
    ]
    npz = np.load(os.path.join(out, names[-1]))
    assert npz["sampler"] == "distilled" and npz["steps"] == 2 and npz["samples"].shape[0] == 10
    # no --steps: the fewest; the round's own folder works too
    assert sample_script.main(["--workdir", distilled, "--per_class", "1", "--out", out]) == 0
    assert sum("distilled1_" in n for n in os.listdir(out)) == 3
    morph = ["--workdir", distilled, "--morph", "0,1", "--frames", "2", "--out", out]
    assert sample_script.main(morph) == 0
    assert any(n.endswith(".gif") and "morph0-1" in n for n in os.listdir(out))


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--steps", "3"], "students of [2, 1] steps, not 3"),
        (["--sampler", "ddim"], "only --sampler distilled can sample (not ddim)"),
        (["--eta", "0.5"], "drop --eta"),
        (["--spacing", "logsnr"], "drop --timesteps and --spacing"),
        (["--inpaint", "top"], "a distilled student cannot take"),
    ],
)
def test_what_a_student_cannot_do_is_one_line(distilled, tmp_path, capsys, extra, words):
    argv = ["--workdir", distilled, "--per_class", "1", "--out", str(tmp_path / "x"), *extra]
    with pytest.raises(SystemExit) as e:
        sample_script.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "x")


def test_evaluate_py_sweeps_the_students(distilled, tiny_classifier_dir, tmp_path):
    out = str(tmp_path / "eval")
    argv = ["--workdir", distilled, "--w", "0,1", "--guidance_sampler", "distilled:2",
            "--samplers", "distilled:1,distilled:2", "--per_class", "2", "--classifier_dir",
            tiny_classifier_dir, "--out", out, "--no_progress"]
    assert evaluate_script.main(argv) == 0
    rows = json.load(open(os.path.join(out, "results.json")))["rows"]
    runs = [(r["sampler"], r["nfe"], r["w"]) for r in rows]
    assert runs == [("distilled", 2, 0.0), ("distilled", 2, 1.0), ("distilled", 1, 1.0)]
    assert all(r["n"] == 20 and r["fd"] >= 0 for r in rows)
    with pytest.raises(SystemExit):
        evaluate_script.main([*argv[:6], "--samplers", "distilled", "--out", str(tmp_path / "y")])


def test_solver_sweep_scores_each_student_against_the_teachers_reference(
    distilled, straight_run, tiny_classifier_dir, tmp_path
):
    copy = str(tmp_path / "copy")  # a second run (the same students): its rows score the same
    shutil.copytree(distilled, copy)
    out = str(tmp_path / "sweep.md")
    argv = ["--workdir", straight_run[0], "--students", f"{distilled},{copy}", "--students_only",
            "--reference", "ddim:4", "--per_class", "2", "--seeds", "0,1", "--w", "1",
            "--classifier_dir", tiny_classifier_dir, "--out", out]
    assert solver_sweep.main(argv) == 0
    result = json.load(open(tmp_path / "sweep.json"))
    rows = result["rows"]
    assert [(r["solver"], r["spacing"], r["calls"]) for r in rows] == [
        ("distilled", "student run", 2), ("distilled", "student run", 1),
        ("distilled", "student copy", 2), ("distilled", "student copy", 1),
    ]
    assert [r["fd"] for r in rows[:2]] == [r["fd"] for r in rows[2:]]
    refs = [r["fd"] for r in result["reference"]]
    for r in rows:
        expected = [fd / ref for fd, ref in zip(r["fd"], refs, strict=True)]
        assert r["ratio"] == pytest.approx(expected)
        assert r["s_per_1000"] > 0
    # the 1-call row is the one-step student at w = 1, seed 0, scored as evaluate.py scores
    student = generation.load_for_sampling(distilled, 1)
    labels = np.repeat(np.arange(student.config.num_classes), 2)
    samples = generation.generate(
        *student[:4], labels, jax.random.PRNGKey(0), plans.for_checkpoint(student, {"w": 1.0})
    ).samples
    dataset = datasets.load_dataset(student.config)
    reference = evaluation.Reference(classifier.get_classifier(dataset, tiny_classifier_dir),
                                     dataset)
    direct = evaluation.evaluate_images(reference, np.asarray(samples), labels)
    assert rows[1]["fd"][0] == pytest.approx(direct["fd"], rel=1e-4)
    assert rows[1]["accuracy"][0] == direct["accuracy"]


def test_solver_sweep_refuses_a_students_folder_that_is_no_distillation_run(
    straight_run, capsys
):
    argv = ["--workdir", straight_run[0], "--students", straight_run[0], "--students_only"]
    with pytest.raises(SystemExit) as err:
        solver_sweep.main(argv)
    message = capsys.readouterr().err
    assert err.value.code == 2 and "is not a distill.py run" in message


def test_cpu_devices_benchmark_times_the_students_on_one_and_two_devices(distilled, tmp_path):
    """benchmarks/cpu_devices.py: each device count in its own process (the script refuses a
    run whose process had another count), a row per student and batch size, training and
    distillation rows, a speed-up column, the report written once and never replaced."""
    from benchmarks import cpu_devices

    out = str(tmp_path / "cpu.md")
    argv = ["--students", distilled, "--steps", "1,2", "--batch_sizes", "4", "--samples", "6",
            "--repeats", "1", "--train_steps", "1", "--distill_steps", "1", "--devices", "1,2",
            "--out", out]
    text = cpu_devices.main(argv)
    assert open(out).read() == text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ")][1:]
    assert [r[0].lstrip("| ") for r in rows] == [
        "sample, 1-step student, batch 4", "sample, 2-step student, batch 4",
        "train step (teacher's config, synthetic data)",
        "distill step, round 0 (guided teacher, synthetic data)",
    ]
    for r in rows:
        one, two, ratio = float(r[2]), float(r[3]), float(r[4].rstrip(" |"))
        assert one > 0 and two > 0 and ratio == pytest.approx(one / two, rel=0.02)
    with pytest.raises(SystemExit) as refused:  # before measuring anything
        cpu_devices.main(argv)
    assert refused.value.code == 2 and open(out).read() == text
