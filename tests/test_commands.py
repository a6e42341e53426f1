"""The command-line layer: the one list parser, the installed entry points, the root shims, and
the light start-up (no jax before the Ctrl-C handler)."""

import os
import subprocess
import sys
import tomllib

import pytest

from diffusion_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_list_reads_and_checks_each_item():
    assert cli.parse_list(" 3,3 ,7,", int, name="--labels") == [3, 3, 7]
    assert cli.parse_list("0,0.5", float, name="--w") == [0.0, 0.5]
    assert cli.parse_list("a,b", name="--x", choices=("a", "b")) == ["a", "b"]
    cases = [
        (dict(text="", item=int), "--x is empty"),
        (dict(text=" , ", item=int), "--x is empty"),
        (dict(text="1,x", item=int, example="1,2"), "--x takes comma-separated integers, e.g. 1,2"),
        (dict(text="1,0", item=int, minimum=1), "--x takes values >= 1"),
        (dict(text="a,c", choices=("a", "b")), r"unknown \['c'\]"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            cli.parse_list(name="--x", **kw)


def test_a_custom_item_parser_keeps_its_own_message():
    def item(text):
        raise ValueError(f"no such thing as {text}")

    with pytest.raises(ValueError, match="no such thing as q"):
        cli.parse_list("q", item, name="--x")


def test_list_type_errors_are_argparse_usage_errors():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--labels", type=cli.list_type(int, name="--labels"))
    assert parser.parse_args(["--labels", "1,2"]).labels == [1, 2]
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--labels", "1,b"])
    assert exit_info.value.code == 2


def test_the_entry_points_name_the_commands_run_functions():
    import importlib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert sorted(scripts) == [
        "diffusion-distill", "diffusion-evaluate", "diffusion-sample", "diffusion-train"
    ]
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert module == f"diffusion_jax.commands.{name.removeprefix('diffusion-')}"
        assert callable(getattr(importlib.import_module(module), function))


def python(code_or_args, **kw):
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, **kw
    )


def test_importing_a_command_does_not_import_jax():
    """So Ctrl-C is handled from the first moment of a command, and the package's names still
    resolve on first use."""
    code = (
        "import sys\n"
        "import diffusion_jax.commands.train, diffusion_jax.commands.sample, "
        "diffusion_jax.commands.evaluate, diffusion_jax.cli\n"
        "assert 'jax' not in sys.modules, 'jax imported'\n"
        "import diffusion_jax\n"
        "assert 'UNet' in dir(diffusion_jax) and 'jax' not in sys.modules\n"
        "assert diffusion_jax.UNet.__name__ == 'UNet' and 'jax' in sys.modules\n"
        "assert diffusion_jax.schedules.make_schedule is diffusion_jax.make_schedule\n"
    )
    proc = python(code, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", ["train.py", "sample.py", "evaluate.py"])
def test_the_root_scripts_run_the_commands(script):
    proc = python([script, "--help"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {script}") and "--workdir" in proc.stdout


def test_a_command_prints_each_message_once_on_stdout():
    """absl (imported with Orbax) gives the root logger a stderr handler; a command's messages
    must not reach it too."""
    code = (
        "from diffusion_jax import cli\n"
        "cli.start('x')\n"
        "import logging, orbax.checkpoint\n"
        "logging.getLogger('diffusion_jax.training').info('resumed here')\n"
    )
    proc = python(code, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "resumed here\n" and "resumed" not in proc.stderr


def test_a_missing_tensorboardx_is_one_line_before_anything_is_written(tmp_path, capsys):
    from unittest import mock

    from diffusion_jax.commands import train

    workdir = tmp_path / "run"
    with mock.patch.dict(sys.modules, {"tensorboardX": None}):  # (import raises ImportError)
        with pytest.raises(SystemExit) as exit_info:
            train.main(["--workdir", str(workdir), "--preset", "tiny", "--no_progress"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and "\n" not in err
    assert "needs tensorboardX" in err and "--no_tensorboard" in err
    assert not workdir.exists()


def test_compilation_cache_folder_and_off_switch(tmp_path):
    """The persistent compilation cache: an XDG default, a named folder, and off; jax's own
    JAX_COMPILATION_CACHE_DIR wins."""
    from diffusion_jax import cli

    env = {"XDG_CACHE_HOME": str(tmp_path)}
    assert cli.enable_compilation_cache(env) == str(tmp_path / "diffusion_jax" / "jax_cache")
    assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "diffusion_jax" / "jax_cache")
    assert env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "0"
    env = {cli.CACHE_ENV: str(tmp_path / "c"), "JAX_COMPILATION_CACHE_DIR": "/mine"}
    assert cli.enable_compilation_cache(env) == str(tmp_path / "c")
    assert env["JAX_COMPILATION_CACHE_DIR"] == "/mine"
    for off in ("0", "off", "OFF"):
        env = {cli.CACHE_ENV: off}
        assert cli.enable_compilation_cache(env) is None and "JAX_COMPILATION_CACHE_DIR" not in env


def test_cpu_cores_shown_to_jax_as_devices():
    """The commands show jax the CPU's cores as devices (the data-parallel mesh then splits each
    batch over them): the largest power of two <= the cores, or $DIFFUSION_JAX_CPU_DEVICES; a
    count already in XLA_FLAGS wins; a bad value is one line naming the variable, exit 2."""
    from diffusion_jax import cli

    for cores, n in ((1, 1), (2, 2), (3, 2), (6, 4), (16, 16), (24, 16)):
        assert cli.cpu_device_count({}, cores) == n
    env = {"XLA_FLAGS": "--xla_backend_optimization_level=0"}
    assert cli.use_cpu_cores(env, cores=6) == 4
    assert env["XLA_FLAGS"] == (
        "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=4"
    )
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}
    assert cli.use_cpu_cores(env, cores=8) is None
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=3"
    env = {cli.CPU_DEVICES_ENV: "1"}
    assert cli.use_cpu_cores(env, cores=8) == 1 and "XLA_FLAGS" not in env
    env = {cli.CPU_DEVICES_ENV: " 3 "}
    assert cli.use_cpu_cores(env, cores=2) == 3
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=3"
    for bad in ("0", "two", "-1", "1.5"):
        with pytest.raises(ValueError, match="DIFFUSION_JAX_CPU_DEVICES must be an integer"):
            cli.cpu_device_count({cli.CPU_DEVICES_ENV: bad})
    code = "from diffusion_jax import cli; cli.start('x.py'); import jax; print(jax.device_count())"
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    for value, out in (("2", "2"), ("1", "1")):
        env[cli.CPU_DEVICES_ENV] = value
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.strip() == out, proc.stderr[-2000:]
    env[cli.CPU_DEVICES_ENV] = "many"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "x.py: $DIFFUSION_JAX_CPU_DEVICES must be an integer >= 1 (1 = the CPU as one device), "
        "got 'many'"
    ]


def sampling_args(*argv):
    import argparse

    from diffusion_jax.commands import flags

    parser = argparse.ArgumentParser()
    parser.add_argument("--w", type=float, default=None)
    flags.add_solver_flags(parser, "default dpmpp2m")
    flags.add_sampler_flags(parser)
    return flags, parser.parse_args(list(argv))


def test_sampling_flags_become_one_plan():
    from diffusion_jax.config import get_config
    from diffusion_jax.plans import SamplingPlan

    config = get_config("mnist")
    flags, args = sampling_args(
        "--solver", "ddim", "--steps", "7", "--eta", "0.5", "--x0", "threshold", "--w", "2",
        "--guidance_interval", "100,800", "--guidance_schedule", "linear",
    )
    assert args.sampler == "ddim"  # --solver is --sampler's alias
    expected = SamplingPlan(
        "ddim", 7, eta=0.5, x0="threshold", w=2.0, guidance_interval=(100, 800),
        guidance_schedule="linear",
    )
    assert flags.sampling_plan(args, config) == expected
    # the command's default solver, then the config's guidance and the solver's own grid
    _, args = sampling_args("--timesteps", "999,500,0")
    plan = flags.sampling_plan(args, config, solver="dpmpp2m")
    assert (plan.solver, plan.timesteps, plan.steps, plan.w) == (
        "dpmpp2m", (999, 500, 0), 3, config.guidance,
    )
    for argv, match in [
        (("--timesteps", "999,0", "--steps", "2"), "drop --steps"),
        (("--guidance_interval", "1,2,3"), "LO,HI"),
        (("--guidance_interval", "800,100"), "LO <= HI"),
        (("--eta", "2"), r"--eta must be a finite number in \[0, 1\]"),
        (("--timesteps", "0,999"), "decreasing"),
        (("--guidance_interval", "0,1000"), "HI <= 999"),
    ]:
        _, args = sampling_args(*argv)
        with pytest.raises(ValueError, match=match):
            flags.sampling_plan(args, config)
