"""sample.py's defects from issue 25: the toy2d reference chain, flags that would be ignored."""

import os

import numpy as np
import pytest

from diffusion_jax import generation, training
from diffusion_jax.commands import sample


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A 2-step toy2d run with T=20 (a tiny MLP): its workdir."""
    workdir = str(tmp_path_factory.mktemp("toy"))
    overrides = dict(num_steps=2, steps_per_dispatch=2, log_every=2, checkpoint_every=2,
                     mlp_hidden=8, mlp_layers=1, num_timesteps=20, sample_steps=5)
    training.train(workdir, preset="toy2d", overrides=overrides, progress=False,
                   tensorboard=False)
    return workdir


def test_toy2d_reference_chain_places_all_steps_under_dpmpp2m(toy_run, tmp_path):
    # dpmpp2m's logsnr spacing places at most T-1 of T=20 cosine steps: the full-length
    # reference chain used to inherit it and fail with "num_steps must be in [1, 19]"
    paths = generation.sample_to_files(toy_run, dict(solver="dpmpp2m", steps=3), per_class=4,
                                       out=str(tmp_path))
    assert sorted(paths) == ["samples", "toy2d"]
    assert np.load(paths["samples"])["samples"].shape == (20, 2)
    assert os.path.getsize(paths["toy2d"]) > 1000


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--morph", "--labels", "1,2"], "--labels"),
        (["--morph", "0,1", "--per_class", "3"], "--per_class"),
        (["--images", "x.npz"], "--images"),
    ],
)
def test_flags_that_would_be_ignored_are_refused(tmp_path, capsys, argv, words):
    missing = str(tmp_path / "no_such_run")  # refused before any checkpoint is read
    with pytest.raises(SystemExit) as e:
        sample.main(["--workdir", missing, *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert words in err and "no_such_run" not in err


def test_eta_outside_0_1_is_refused_before_the_checkpoint(tmp_path, capsys):
    missing = str(tmp_path / "no_such_run")
    with pytest.raises(SystemExit) as e:
        sample.main(["--workdir", missing, "--sampler", "ddim", "--eta", "1e30"])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "--eta" in err and "no_such_run" not in err


def test_nonfinite_samples_name_the_unusual_settings():
    from diffusion_jax import plans
    from diffusion_jax.config import get_config

    config = get_config("tiny")
    unusual = plans.resolve(config, solver="ddim", steps=10, w=50.0, eta=0.5, x0="none")
    said = generation._nonfinite_causes(config, unusual)
    assert "--w 50" in said and "--eta 0.5" in said and "--x0 none" in said
    assert generation._nonfinite_causes(config, plans.resolve(config)) == ""


def test_per_class_100_grid_wraps_and_gif_shows_ten_per_class(tmp_path):
    from PIL import Image

    from diffusion_jax import images

    labels = np.repeat(np.arange(10), 100)
    samples = np.random.default_rng(0).uniform(-1, 1, (1000, 8, 8, 1)).astype(np.float32)
    images.save_grid(samples, labels, str(tmp_path / "g.png"))
    width, height = Image.open(tmp_path / "g.png").size
    # 16 cells of 9 px at scale 2 plus the label margin, not 100 cells (5852 px at 28x28)
    assert width <= 16 * 9 * 2 + 60 and height > 10 * 7 * 9 * 2 * 0.9
    shown = generation.gif_selection(labels)
    assert len(shown) == 100 and np.all(np.bincount(labels[shown]) == 10)
    assert list(shown[:10]) == list(range(10))  # the first samples of class 0, in order
    snaps = np.broadcast_to(samples[shown], (20, *samples[shown].shape))
    images.save_gif(snaps, str(tmp_path / "r.gif"), per_row=10)
    assert os.path.getsize(tmp_path / "r.gif") < 2_000_000


def test_gif_selection_keeps_fewer_than_the_cap():
    labels = np.array([3, 1, 3, 1, 1])
    np.testing.assert_array_equal(generation.gif_selection(labels, per_class=2), [1, 3, 0, 2])


CACHED_SAMPLE = """
import os, sys, jax
jax.config.update("jax_compilation_cache_dir", sys.argv[2])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
from diffusion_jax import generation
generation.sample_to_files(sys.argv[1], dict(steps=4), per_class=2, out=sys.argv[3], overwrite=True)
"""


def test_a_second_identical_call_compiles_nothing_new(toy_run, tmp_path):
    # issue 22: the ahead-of-time compile (ChainCall.compile: .lower().compile()) goes through
    # jax's persistent cache, so with the cache on a repeated sample.py reads every program
    import subprocess
    import sys

    cache, out = str(tmp_path / "cache"), str(tmp_path / "out")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    counts = []
    for _ in range(2):
        subprocess.run([sys.executable, "-c", CACHED_SAMPLE, toy_run, cache, out], env=env,
                       check=True, capture_output=True, timeout=120)
        counts.append(len(os.listdir(cache)))
    assert counts[0] >= 2 and counts[1] == counts[0], counts  # the chain and the reference


DYING_SAMPLE = """
import os, signal, sys
from diffusion_jax import generation, images
save_npz = images.save_npz
def dying(*a, **k):  # the plot is written; die while the .npz is being written
    save_npz(*a, **k)
    os.kill(os.getpid(), getattr(signal, sys.argv[3]))
images.save_npz = dying
generation.sample_to_files(sys.argv[1], dict(steps=4), per_class=2, out=sys.argv[2])
"""


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGINT"])
def test_a_killed_sample_call_leaves_nothing_and_the_rerun_works(toy_run, tmp_path, signal_name):
    import subprocess
    import sys

    out = str(tmp_path / "out")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", DYING_SAMPLE, toy_run, out, signal_name],
                          env=env, capture_output=True, timeout=120)
    assert done.returncode != 0
    visible = [n for n in os.listdir(out) if not n.startswith(".")]
    assert visible == []  # neither the plot nor the .npz
    # (no --overwrite)
    paths = generation.sample_to_files(toy_run, dict(steps=4), per_class=2, out=out)
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in paths.values())


def test_an_incomplete_older_set_is_named(toy_run, tmp_path):
    paths = generation.sample_to_files(toy_run, dict(steps=4), per_class=2, out=str(tmp_path))
    os.remove(paths["samples"])
    with pytest.raises(FileExistsError, match="incomplete set"):
        generation.sample_to_files(toy_run, dict(steps=4), per_class=2, out=str(tmp_path))


def test_samples_are_drawn_in_bounded_chunks(toy_run, tmp_path):
    """More labels than batch_size are drawn in chunks of batch_size rows: chunk c from
    fold_in(key, c) (chunk 0 from key, so a single batch is what it always was), the last
    chunk padded without changing its samples, and the snapshots kept only where asked."""
    import jax

    ckpt = generation.load_for_sampling(toy_run)
    config = ckpt.config
    labels = np.repeat(np.arange(config.num_classes), 10)[:20]
    key = jax.random.PRNGKey(3)
    plan = dict(solver="ddim", steps=3, w=0.5)

    def draw(part, k, **extra):
        return generation.generate(*ckpt[:4], part, k, plan, **extra)

    whole = draw(labels, key, batch_size=7, num_snapshots=2, snapshot_rows=[0, 8, 19])
    assert whole.samples.shape == (20, 2) and whole.snapshots.shape == (2, 3, 2)
    single = [np.asarray(draw(labels[:7], key).samples)]
    single += [np.asarray(draw(labels[a:b], jax.random.fold_in(key, c)).samples)
               for c, (a, b) in ((1, (7, 14)), (2, (14, 20)))]  # 6 rows: padded to 7 above
    np.testing.assert_allclose(whole.samples, np.concatenate(single), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(whole.snapshots[-1], whole.samples[[0, 8, 19]], atol=1e-6)
    # one batch of them all keeps the old samples (no chunking below batch_size)
    np.testing.assert_array_equal(draw(labels, key, batch_size=20).samples,
                                  draw(labels, key).samples)
    with pytest.raises(ValueError, match="--batch_size"):
        generation.sample_to_files(toy_run, per_class=2, batch_size=0, out=str(tmp_path))

    paths = generation.sample_to_files(toy_run, dict(solver="ddim", steps=3), per_class=3,
                                       batch_size=4, out=str(tmp_path))
    assert "_batch4_" in os.path.basename(paths["samples"])
    saved = np.load(paths["samples"])
    assert saved["samples"].shape == (3 * config.num_classes, 2)
    np.testing.assert_array_equal(saved["labels"], np.repeat(np.arange(config.num_classes), 3))


def test_explicit_timesteps_and_guidance_flags_reach_the_files(toy_run, tmp_path, capsys):
    argv = ["--workdir", toy_run, "--out", str(tmp_path), "--per_class", "2", "--solver", "ddim",
            "--timesteps", "19,10,0", "--guidance_interval", "0,10",
            "--guidance_schedule", "linear"]
    assert sample.main(argv) == 0
    npz = [f for f in os.listdir(tmp_path) if f.endswith("_samples.npz")]
    assert len(npz) == 1 and "ddim3_t19-10-0_gi0,10_glinear_w" in npz[0], npz
    # the same grid by steps and spacing gives the same samples (uniform: 19, 10, 0 of T = 20)
    same = generation.sample_to_files(toy_run, dict(solver="ddim", steps=3,
                                      guidance_interval=(0, 10), guidance_schedule="linear"),
                                      per_class=2, out=str(tmp_path / "by_steps"))
    saved = np.load(tmp_path / npz[0])
    np.testing.assert_array_equal(saved["samples"], np.load(same["samples"])["samples"])
    assert list(saved["timesteps"]) == [19, 10, 0] and list(saved["guidance_interval"]) == [0, 10]
    assert str(saved["guidance_schedule"]) == "linear" and "x0" not in saved.files
