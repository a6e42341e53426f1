"""End to end on the CPU with the tiny preset: train, checkpoint, resume bitwise, sample to files,
and the failure paths (corrupt or foreign checkpoints, conflicts, NaN data, bad outputs)."""

import json
import logging
import os

import jax
import numpy as np
import pytest
from conftest import TINY

from diffusion_jax import checkpoints, generation, training
from diffusion_jax import workdir as workdir_lib
from diffusion_jax.commands import sample as sample_script
from diffusion_jax.commands import train as train_script


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_training_writes_checkpoints_and_metrics(straight_run):
    workdir, result = straight_run
    assert not result.interrupted and int(result.state.step) == 8
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert all(np.isfinite(r["loss"]) and r["images_per_sec"] > 0 for r in records)
    # the EMA moved away from the initial parameters and differs from the raw parameters
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(leaves(result.state.ema_params), leaves(result.state.params), strict=True)
    )


def test_interrupted_and_resumed_run_is_bitwise_identical(straight_run, tmp_path, tiny_data):
    _, straight = straight_run
    workdir = str(tmp_path / "resumed")
    first = training.train(workdir, dataset=tiny_data, stop_after=3, **TINY)  # mid-way: step 3
    assert first.interrupted and int(first.state.step) == 3
    resumed = training.train(workdir, dataset=tiny_data, **TINY)
    assert int(resumed.state.step) == 8
    for name in ("params", "ema_params", "opt_state"):
        for a, b in zip(
            leaves(getattr(straight.state, name)), leaves(getattr(resumed.state, name)), strict=True
        ):
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_finished_run_is_not_retrained(straight_run, tiny_data):
    workdir, straight = straight_run
    again = training.train(workdir, dataset=tiny_data, **TINY)
    assert int(again.state.step) == 8
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]


def test_resume_refuses_a_conflicting_config(straight_run, tiny_data):
    workdir, _ = straight_run
    with pytest.raises(training.ConfigConflictError, match="lr"):
        training.train(workdir, dataset=tiny_data, overrides={"lr": 0.5}, **TINY)


def test_sample_script_writes_grid_gif_npz(straight_run, tmp_path, capsys):
    workdir, _ = straight_run
    out = str(tmp_path / "out")
    args = ["--workdir", workdir, "--per_class", "2", "--out", out, "--frames", "4"]
    assert sample_script.main(args) == 0
    printed = capsys.readouterr().out
    assert "compile" in printed and "sampling" in printed and "device" in printed
    files = sorted(os.listdir(out))
    assert [f.split("_")[-1] for f in files] == ["grid.png", "reverse.gif", "samples.npz"]
    npz = np.load(os.path.join(out, files[2]))
    assert npz["samples"].shape == (20, 8, 8, 1) and npz["samples"].dtype == np.uint8
    np.testing.assert_array_equal(npz["labels"], np.repeat(np.arange(10), 2))
    from PIL import Image

    assert Image.open(os.path.join(out, files[1])).n_frames == 4
    # a second identical call refuses to overwrite, and leaves the files as they were
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in files}
    with pytest.raises(SystemExit) as exit_info:
        sample_script.main(args)
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert before == {f: os.path.getmtime(os.path.join(out, f)) for f in files}


def test_sampling_is_reproducible(straight_run):
    workdir, _ = straight_run
    config, model, params, shape, step, _ = generation.load_for_sampling(workdir)
    assert step == 8 and shape == (8, 8, 1)
    labels = np.array([1, 2, 3])
    a = generation.generate(config, model, params, shape, labels, jax.random.PRNGKey(0))
    b = generation.generate(config, model, params, shape, labels, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(a.samples, b.samples)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--labels", "3,12"], "labels must be in [0, 10]"),
        (["--steps", "0"], "--steps must be in [1, 20]"),
        (["--steps", "21"], "--steps must be in [1, 20]"),
        (["--frames", "1"], "--frames must be >= 2"),
        (["--per_class", "0"], "--per_class must be >= 1"),
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
        (["--seed", "4294967296"], "--seed must be <= 4294967295"),  # PRNGKey: seed 0 again
        (["--seed", "9223372036854775808"], "--seed must be <= 4294967295"),  # PRNGKey overflow
        (["--w", "nan"], "--w must be a finite number >= 0, got nan"),
        (["--w", "inf"], "--w must be a finite number >= 0, got inf"),
        (["--w=-1"], "--w must be a finite number >= 0, got -1.0"),
    ],
)
def test_sample_script_bad_input(straight_run, tmp_path, capsys, extra, message):
    workdir, _ = straight_run
    with pytest.raises(SystemExit) as exit_info:
        sample_script.main(["--workdir", workdir, "--out", str(tmp_path)] + extra)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_unwritable_output(straight_run, tmp_path, capsys):
    workdir, _ = straight_run
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit):
        sample_script.main(["--workdir", workdir, "--out", str(blocker / "sub")])
    assert "cannot write to output folder" in capsys.readouterr().err


def test_missing_corrupt_and_foreign_checkpoints(straight_run, tmp_path, capsys):
    with pytest.raises(checkpoints.CheckpointError, match="does not exist"):
        generation.load_for_sampling(str(tmp_path / "missing"))
    foreign = tmp_path / "foreign"
    (foreign / "checkpoints" / "5" / "meta").mkdir(parents=True)
    (foreign / "checkpoints" / "5" / "_CHECKPOINT_METADATA").write_text("{}")
    with pytest.raises(checkpoints.CheckpointError):
        generation.load_for_sampling(str(foreign))
    with pytest.raises(checkpoints.CheckpointError, match="holds no diffusion_jax checkpoints"):
        generation.load_for_sampling(str(tmp_path))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(checkpoints.CheckpointError, match="is a file"):
        generation.load_for_sampling(str(tmp_path / "notes.txt"))
    # corrupt a copy of a real checkpoint: its EMA arrays are gone
    import shutil

    workdir, _ = straight_run
    broken = tmp_path / "broken"
    shutil.copytree(workdir, broken)
    shutil.rmtree(broken / "checkpoints" / "8" / "ema")
    with pytest.raises(checkpoints.CheckpointError, match="could not be read"):
        generation.load_for_sampling(str(broken))


def test_train_script_refuses_foreign_folder(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(["--workdir", str(tmp_path), "--preset", "tiny", "--no_progress"])
    assert exit_info.value.code == 2
    assert "not a diffusion_jax workdir" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["thesis.tex"]


def test_the_train_command_writes_tensorboard_unless_told_not_to(tmp_path, capsys, monkeypatch):
    """By default a run's records also reach TensorBoard, the same values as metrics.jsonl
    (the tiny preset as the session's straight run, so nothing compiles again)."""
    from test_hooks import read_scalars

    workdir = tmp_path / "run"
    argv = ["--workdir", str(workdir), "--preset", "tiny", "--no_progress"]
    assert train_script.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("training unet on mnist5k") and "done: 8 steps" in out
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    scalars = read_scalars(workdir / "tensorboard")
    # (steps exactly, losses to float32 rounding: pytest.approx takes no nested tuples)
    assert [step for step, _ in scalars["loss"]] == [r["step"] for r in records]
    assert [loss for _, loss in scalars["loss"]] == pytest.approx(
        [r["loss"] for r in records], rel=1e-6
    )

    # --no_tensorboard reaches training (checked on the call: a second run would cost a run)
    class Called(Exception):
        pass

    def record_call(*args, **kwargs):
        raise Called(kwargs)

    monkeypatch.setattr(training, "train", record_call)
    with pytest.raises(Called) as call:
        train_script.main(["--workdir", str(tmp_path / "other"), "--no_tensorboard"])
    assert call.value.args[0]["tensorboard"] is False


def test_nan_data_stops_with_a_clear_error(tmp_path, tiny_data):
    poisoned = tiny_data._replace(train_x=np.full_like(tiny_data.train_x, np.nan))
    with pytest.raises(training.TrainingDivergedError, match="non-finite for"):
        training.train(
            str(tmp_path), dataset=poisoned, overrides={"max_nonfinite_steps": 2}, **TINY
        )
    assert not os.path.exists(tmp_path / "checkpoints" / "4")  # nothing saved after the failure


def test_toy2d_run_and_scatter_plot(tmp_path):
    workdir = str(tmp_path / "toy")
    overrides = dict(
        num_steps=4,
        steps_per_dispatch=2,
        log_every=2,
        checkpoint_every=4,
        mlp_hidden=16,
        mlp_layers=1,
        num_timesteps=20,
        sample_steps=5,
    )
    result = training.train(
        workdir, preset="toy2d", overrides=overrides, progress=False, tensorboard=False
    )
    assert int(result.state.step) == 4
    paths = generation.sample_to_files(workdir, {"steps": 5}, per_class=20)
    assert sorted(paths) == ["samples", "toy2d"]
    npz = np.load(paths["samples"])
    assert npz["samples"].shape == (100, 2) and npz["samples"].dtype == np.float32
    assert os.path.getsize(paths["toy2d"]) > 1000


def test_a_workdir_in_use_is_refused(tmp_path, tiny_data):
    workdir = str(tmp_path / "busy")
    with workdir_lib.workdir_lock(workdir):
        with pytest.raises(checkpoints.CheckpointError, match="another training process"):
            training.train(workdir, dataset=tiny_data, **TINY)
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
    # a lock whose process is gone is taken over
    with open(os.path.join(workdir, workdir_lib.LOCK_NAME), "w") as f:
        import socket

        f.write(f"{socket.gethostname()} 999999999")
    with workdir_lib.workdir_lock(workdir):
        pass
    assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_NAME))


def test_sigint_writes_a_checkpoint_and_stops(tmp_path, tiny_data):
    """A real SIGINT, delivered once training has started, ends the run after the current
    dispatch with a checkpoint that a later run resumes from."""
    import signal

    from test_stopping import train_signalled_at_start

    workdir = str(tmp_path / "sigint")
    before = signal.getsignal(signal.SIGINT)  # (SIG_IGN when pytest runs in the background)
    result = train_signalled_at_start(workdir, tiny_data, signal.SIGINT)
    # The first dispatch is one chunk: the tiny preset's 2 steps per dispatch (later ones fit
    # dispatch.SECONDS).
    assert result.interrupted and int(result.state.step) == 2
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
    assert signal.getsignal(signal.SIGINT) is before  # handler restored


def test_sample_script_sampler_options_reach_the_file_names(straight_run, tmp_path):
    """Every sampler option is reachable from the command line and named in the outputs."""
    workdir, _ = straight_run
    out = str(tmp_path / "opts")
    base = ["--workdir", workdir, "--per_class", "1", "--out", out, "--frames", "2"]
    runs = {
        "dpmpp2m3_w": ["--sampler", "dpmpp2m", "--steps", "3"],
        "dpmpp2m3_quadratic_x0threshold_w": [
            "--sampler",
            "dpmpp2m",
            "--steps",
            "3",
            "--x0",
            "threshold",
            "--spacing",
            "quadratic",
        ],
        "ddpm4_large_x0none_w": [
            "--sampler",
            "ddpm",
            "--steps",
            "4",
            "--variance",
            "large",
            "--x0",
            "none",
        ],
        "ddim4_eta0.5_x0threshold_q0.9_w": [
            "--sampler",
            "ddim",
            "--steps",
            "4",
            "--eta",
            "0.5",
            "--x0",
            "threshold",
            "--threshold_quantile",
            "0.9",
        ],
    }
    for tag, extra in runs.items():
        assert sample_script.main(base + extra) == 0
        names = [f for f in os.listdir(out) if f.startswith(f"step8_{tag}")]
        assert len(names) == 3, (tag, sorted(os.listdir(out)))
    npz = np.load(
        os.path.join(
            out, [f for f in os.listdir(out) if "quadratic" in f and f.endswith(".npz")][0]
        )
    )
    assert str(npz["sampler"]) == "dpmpp2m" and str(npz["spacing"]) == "quadratic"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lr", "nan"], "lr must be a finite number > 0, got nan"),
        (["--grad_clip", "inf"], "grad_clip must be a finite number > 0, got inf"),
        (["--ema_decay", "nan"], r"ema_decay must be in [0, 1), got nan"),
        (["--guidance", "nan"], "guidance must be a finite number >= 0, got nan"),
        (["--seed", "4294967296"], "seed must be <= 4294967295"),
        (["--seed", "9223372036854775808"], "seed must be <= 4294967295"),
    ],
)
def test_train_script_refuses_bad_numbers(tmp_path, capsys, extra, message):
    """One line, exit 2, and no workdir: nothing trains with nonsense values."""
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(["--workdir", str(workdir), "--preset", "tiny", "--no_progress"] + extra)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1
    assert not workdir.exists()


def test_train_script_unwritable_workdir(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(["--workdir", str(tmp_path / "file" / "run"), "--preset", "tiny"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert f"cannot create --workdir {str(tmp_path / 'file' / 'run')!r}" in err
    assert "is a file, not a folder" in err


def test_the_initial_state_is_one_compiled_program(caplog):
    """Parameters, optimiser state and EMA of step 0 come from one jitted program (built leaf
    by leaf, the tiny preset's took 54 more small compiles before the first step), with the
    same parameters as the network's own init and the EMA equal to them."""
    from diffusion_jax import models
    from diffusion_jax.config import get_config

    config = get_config("tiny", seed=4242)  # a program no other test compiled
    model = models.build_model(config)
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING, logger="jax"):
            state = training.init_state(config, model, (1, 8, 8, 1))
            jax.block_until_ready(state)
    finally:
        jax.config.update("jax_log_compiles", False)
    compiles = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    # One program holds the state; the rest are the key's and the dummy inputs' tiny programs
    # (fewer when an earlier test compiled them). Leaf by leaf there were dozens of copies and
    # broadcasts, one per array of the optimiser state and the EMA.
    assert sum("jit(init)" in c for c in compiles) == 1, compiles
    assert not any("jit(copy)" in c for c in compiles) and len(compiles) <= 10, compiles
    key = jax.random.fold_in(jax.random.PRNGKey(4242), 0)
    expected = models.init_params(model, key, (1, 8, 8, 1))
    for a, b, c in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(expected),
                       jax.tree_util.tree_leaves(state.ema_params), strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert int(state.step) == 0
