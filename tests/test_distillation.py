"""Guided progressive distillation: the target against a float64 two-step DDIM on the exact
Gaussian-mixture denoiser, a small student learning it, the w-embedding, rounds with resume, and
bad inputs."""

import dataclasses
import json
import os

import exact
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import (
    checkpoints,
    distill_rounds,
    distillation,
    generation,
    models,
    plans,
    train_step,
)
from diffusion_jax import config as config_lib
from diffusion_jax.data import Dataset
from diffusion_jax.mlp import MLPDenoiser
from diffusion_jax.schedules import get_betas, make_schedule

T = 1000
MEANS = np.array([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.0]])
STD, WEIGHTS = 0.3, np.array([0.3, 0.3, 0.4])
NULL = 3


def guided_eps_np(x, abar, c, w):
    """Float64 guided eps (1 + w) eps(x | c) - w eps(x) of the mixture, one point x (D,)."""
    var = abar * STD**2 + 1 - abar
    conditional = np.sqrt(1 - abar) * (x - np.sqrt(abar) * MEANS[c]) / var
    unconditional = exact.mixture_eps_np(x[None], abar, MEANS, STD, WEIGHTS)[0]
    return (1 + w) * conditional - w * unconditional


def ddim_np(x, abar_from, abar_to, eps):
    """DDIM (eta = 0) in float64, written from Song et al. (2021), eq. 12."""
    x0 = (x - np.sqrt(1 - abar_from) * eps) / np.sqrt(abar_from)
    return np.sqrt(abar_to) * x0 + np.sqrt(1 - abar_to) * eps


def exact_teacher(schedule_name):
    abar = np.cumprod(1 - get_betas(schedule_name, T))
    params = exact.mixture_params(MEANS, STD, WEIGHTS, abar)
    teacher = distillation.predictor(exact.mixture_eps, "eps", None, True, NULL)
    return abar, params, teacher


def test_target_reproduces_teachers_two_steps():
    """One DDIM step t -> t'' with the target as x0 lands where two guided float64 DDIM steps
    t -> t' -> t'' land, at every level of an 8-step grid (the last pair ends at the data).

    The linear schedule: on the cosine one, sqrt(abar) at t = 999 is 5e-5 and the float32
    teacher itself (x0 = (z - sigma eps) / alpha) is then only good to 1e-3."""
    abar, params, teacher = exact_teacher("linear")
    grid = distillation.start_grid(T, 8)
    lv = distillation.levels("linear", T, grid)
    rng = np.random.default_rng(0)
    batch = 64
    i = np.repeat(np.arange(4), batch // 4)
    labels, w = rng.integers(0, 3, batch), rng.uniform(0, 3, batch)
    z = rng.normal(size=(batch, 2)).astype(np.float32)
    target, _ = distillation.distill_target(
        teacher, params, make_schedule("linear", T), lv, jnp.asarray(z), jnp.asarray(i),
        jnp.asarray(labels), jnp.asarray(w, jnp.float32),
    )
    target = np.asarray(target, np.float64)
    levels = np.append(abar[grid], 1.0)
    worst = 0.0
    for b in range(batch):
        j = 2 * i[b]
        x = z[b].astype(np.float64)
        for k in (j, j + 1):
            x = ddim_np(x, levels[k], levels[k + 1], guided_eps_np(x, levels[k], labels[b], w[b]))
        a, a2 = levels[j], levels[j + 2]
        student_eps = (z[b] - np.sqrt(a) * target[b]) / np.sqrt(1 - a)
        landed = np.sqrt(a2) * target[b] + np.sqrt(1 - a2) * student_eps
        worst = max(worst, np.max(np.abs(landed - x)))
        if j + 2 == len(grid):  # into the data: the target is the teacher's x0 itself
            np.testing.assert_allclose(target[b], x, atol=1e-5)
    assert worst < 1e-5, worst


def test_target_x0_closed_form():
    """target_x0 inverts a DDIM step: stepping from z_t with the x0 it returns gives z_t''."""
    rng = np.random.default_rng(1)
    z, z2 = rng.normal(size=(2, 5, 3))
    a, s = np.array([0.3] * 5), np.sqrt(1 - np.array([0.09] * 5))
    a2, s2 = np.array([0.8, 0.8, 0.8, 1.0, 1.0]), np.array([0.6, 0.6, 0.6, 0.0, 0.0])
    x = np.asarray(distillation.target_x0(*(jnp.asarray(v, jnp.float32) for v in
                                             (z, z2, a, s, a2, s2))), np.float64)
    eps = (z - a[:, None] * x) / s[:, None]
    np.testing.assert_allclose(a2[:, None] * x + s2[:, None] * eps, z2, atol=1e-5)
    np.testing.assert_allclose(x[3:], z2[3:], atol=1e-6)  # at the data: z_t'' itself


def test_grids():
    grid = distillation.start_grid(T, 8)
    assert list(grid) == [999, 856, 714, 571, 428, 285, 143, 0]
    assert list(distillation.student_grid(grid, 4)) == [999, 714, 428, 143]
    assert list(distillation.student_grid(grid, 1)) == [999]
    with pytest.raises(ValueError, match="must divide 8"):
        distillation.student_grid(grid, 3)
    with pytest.raises(ValueError, match=r"start_steps must be in \[2, 1000\]"):
        distillation.start_grid(T, 1024)
    lv = distillation.levels("cosine", T, [999, 0])
    assert float(lv.alpha[-1]) == 1.0 and float(lv.sigma[-1]) == 0.0


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_logsnr_start_grid_is_even_in_log_snr(schedule_name):
    """Each level of a 16-level "logsnr" grid is the timestep nearest its share of the log-SNR
    range (float64 numpy): bracketed by the log-SNRs of its two neighbouring timesteps. The
    range runs from log-SNR at t = 0 to the noisiest timestep above the floor (the cosine
    schedule ends below it: its last level is then under T-1)."""
    abar = np.cumprod(1 - get_betas(schedule_name, T))
    grid = distillation.start_grid(T, 16, "logsnr", abar)
    lam = np.log(abar / (1 - abar))
    assert grid[-1] == 0 and np.all(np.diff(grid) < 0) and len(grid) == 16
    assert (grid[0] == T - 1) == (schedule_name == "linear")
    targets = np.linspace(lam[grid[0]], lam[0], 16)
    for t, target in zip(grid[1:-1], targets[1:-1], strict=True):
        assert lam[t + 1] <= target <= lam[t - 1], (t, target)
    # the student grids are every second, fourth... level, so also even in log-SNR
    assert list(distillation.student_grid(grid, 4)) == list(grid[::4])


# ---------------------------------------------------------------------------------------------
# A small MLP student learns the exact teacher's two-step map


def mixture_data(n, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=WEIGHTS)
    return (MEANS[y] + STD * rng.normal(size=(n, 2))).astype(np.float32), y.astype(np.int32)


def two_step_error(student, params, teacher, tparams, schedule, lv, key, n=2048):
    """RMS distance between the student's one-step map and the teacher's two-step map over
    n points z_t ~ q(z_t) at random student levels and w in [0, 2]."""
    x, y = mixture_data(n, seed=7)
    k1, k2, k3 = jax.random.split(key, 3)
    i = jax.random.randint(k1, (n,), 0, lv.timesteps.shape[0] // 2)
    w = jax.random.uniform(k2, (n,), maxval=2.0)
    j = 2 * i
    z = distillation.ddim_move(jnp.asarray(x), jax.random.normal(k3, (n, 2)), lv.alpha[j],
                               lv.sigma[j])
    _, z2 = distillation.distill_target(teacher, tparams, schedule, lv, z, i, jnp.asarray(y), w)
    x0, eps = student(params, schedule, z, lv.timesteps[j], jnp.asarray(y), w)
    mine = distillation.ddim_move(x0, eps, lv.alpha[j + 2], lv.sigma[j + 2])
    return float(jnp.sqrt(jnp.mean(jnp.square(mine - z2))))


def test_mlp_student_learns_two_step_map():
    """400 steps of a 64-wide MLP with the w input (v-prediction) on 2-D mixture data: its
    one-step map comes within 0.07 RMS of the guided teacher's two-step map (measured 0.026;
    0.92 before training), for w in [0, 2] on a 4 -> 2 step round."""
    _, tparams, teacher = exact_teacher("cosine")
    schedule = make_schedule("cosine", T)
    lv = distillation.levels("cosine", T, distillation.start_grid(T, 4))
    net = MLPDenoiser(num_classes=3, hidden=64, num_layers=2, guidance_embedding=True)
    student = distillation.predictor(models.denoiser(net), "v")
    settings = distillation.DistillSettings(
        start_steps=4, rounds=1, steps_per_round=400, batch_size=256, lr=3e-3, warmup_steps=20,
        ema_decay=0.9, w_max=2.0,
    )
    params = models.init_params(net, jax.random.PRNGKey(0), (1, 2))
    state = distillation.init_state(settings, params)
    before = two_step_error(student, state.params, teacher, tparams, schedule, lv,
                            jax.random.PRNGKey(9))
    step = distillation.make_distill_step(settings, student, teacher)
    data_x, data_y = (jnp.asarray(a) for a in mixture_data(4096))
    key = jax.random.PRNGKey(3)
    for _ in range(settings.steps_per_round):
        state, metrics = step(state, tparams, schedule, lv, data_x, data_y, key)
    after = two_step_error(student, state.params, teacher, tparams, schedule, lv,
                           jax.random.PRNGKey(9))
    assert np.isfinite(float(metrics["loss"]))
    assert before > 0.5 and after < 0.07, (before, after)


# ---------------------------------------------------------------------------------------------
# The w-embedding


def test_guidance_embedding_starts_as_the_teacher():
    """A student grafted from a teacher computes the teacher's output at any w; without the
    embedding the parameters are exactly the old structure, and w is refused."""
    teacher = MLPDenoiser(num_classes=3, hidden=16, num_layers=1)
    student = dataclasses.replace(teacher, guidance_embedding=True)
    tparams = models.init_params(teacher, jax.random.PRNGKey(0), (1, 2))
    tparams = jax.tree_util.tree_map(lambda a: a + 0.1, tparams)  # a non-zero output head
    sparams = distillation.graft(tparams, models.init_params(student, jax.random.PRNGKey(1),
                                                             (1, 2)))
    extra = set(sparams["Conditioning_0"]) - set(tparams["Conditioning_0"])
    assert extra == {"guidance_dense0", "guidance_dense1"}
    x, t, y = jnp.ones((3, 2)), jnp.array([0, 500, 999]), jnp.array([0, 1, 3])
    want = teacher.apply({"params": tparams}, x, t, y)
    for w in (0.0, 1.5, jnp.array([0.0, 2.0, 7.0])):
        got = student.apply({"params": sparams}, x, t, y, w=w)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="no guidance-weight input"):
        teacher.apply({"params": tparams}, x, t, y, w=1.0)
    with pytest.raises(ValueError, match="no match in the student"):
        distillation.graft(sparams, tparams)


def test_shipped_unet_structure_unchanged():
    """The shipped checkpoint's network, built as before, has the parameters it was saved with
    (the restore is strict), and its student has exactly two more Dense layers."""
    path = os.path.join(os.path.dirname(__file__), "..", "pretrained", "mnist5k_cpu")
    config, shape = checkpoints.read_config(path)
    plain = models.abstract_params(models.build_model(config), (1, *shape))
    with_w = models.abstract_params(models.build_model(config, True), (1, *shape))
    flat_plain = jax.tree_util.tree_flatten_with_path(plain)[0]
    flat_w = jax.tree_util.tree_flatten_with_path(with_w)[0]
    assert len(flat_w) == len(flat_plain) + 4  # two kernels, two biases
    assert all("guidance_dense" not in jax.tree_util.keystr(p) for p, _ in flat_plain)


def test_shipped_checkpoint_samples_as_before():
    """The shipped model loads (a strict restore: same parameter structure) and samples what it
    sampled before the networks had the optional w-embedding: values recorded with the code of
    commit 3896d73 (2 DDIM steps, labels 3 and 7, key 0) at XLA's default optimisation level;
    the tests compile at level 0, which moves them by up to 7e-5 relative (any change to the
    network would move them by O(1))."""

    path = os.path.join(os.path.dirname(__file__), "..", "pretrained", "mnist5k_cpu")
    ckpt = generation.load_for_sampling(path)
    out = generation.generate(*ckpt[:4], np.array([3, 7]), jax.random.PRNGKey(0), dict(steps=2))
    x = np.asarray(out.samples, np.float64)
    got = [x.sum(), np.abs(x).sum(), x[0, 10, 10, 0], x[1, 14, 12, 0]]
    want = [-263.94165751338005, 1551.4557720720768, 0.983083188533783, -0.9975146055221558]
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Rounds on disk: resume, the distilled sampler, bad inputs


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A toy2d MLP teacher checkpoint (random parameters, saved as training saves them) and a
    small data set."""
    config = config_lib.get_config(
        "toy2d", mlp_hidden=16, mlp_layers=1, num_timesteps=40, sample_steps=10
    )
    model = models.build_model(config)
    state = train_step.init_state(config, model, (1, 2))
    state = state.replace(params=jax.tree_util.tree_map(lambda a: a + 0.05, state.params))
    folder = str(tmp_path_factory.mktemp("teacher"))
    mngr = checkpoints.manager(os.path.join(folder, checkpoints.SUBDIR))
    part = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    checkpoints.save(mngr, 0, part, state.params, config, (2,))
    mngr.wait_until_finished()
    mngr.close()
    x, y = mixture_data(512)
    x8 = np.concatenate([x, x[:, ::-1]])  # (the toy2d data set has 8 classes)
    ds = Dataset("toy2d", x8, np.concatenate([y, y + 3]), x8, np.concatenate([y, y + 3]), 8)
    return folder, ds


SMALL = distillation.DistillSettings(
    start_steps=8, rounds=2, steps_per_round=6, batch_size=16, lr=1e-2, warmup_steps=1,
    checkpoint_every=2, log_every=3, w_max=2.0,
)


def _ema(out, r):
    return generation.load_for_sampling(checkpoints.round_folder(out, r)).params


def _same_params(a, b, **tol):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        if tol:
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_equals_uninterrupted(teacher_run, tmp_path):
    folder, ds = teacher_run
    straight = str(tmp_path / "straight")
    done = distill_rounds.distill(straight, folder, SMALL, dataset=ds)
    assert done == (checkpoints.round_folder(straight, 1), 2, False)
    split = str(tmp_path / "split")
    # stopped mid-round 0 (step 3: between checkpoints), then mid-round 1, then to the end
    assert distill_rounds.distill(split, folder, SMALL, dataset=ds, stop_after=3).interrupted
    assert distill_rounds.distill(split, folder, SMALL, dataset=ds, stop_after=5).interrupted
    assert not distill_rounds.distill(split, folder, SMALL, dataset=ds).interrupted
    for r in (0, 1):
        _same_params(_ema(straight, r), _ema(split, r))
    student = generation.load_for_sampling(straight)  # a run's folder: its fewest steps
    assert student.distill["timesteps"] == list(distillation.start_grid(40, 8)[::4])
    assert student.distill["steps"] == 2 and student.model.guidance_embedding
    plan = plans.for_checkpoint(student, {"w": 1.0})
    assert (plan.solver, plan.steps, plan.tag()) == ("distilled", 2, "distilled2")
    samples = generation.generate(*student[:4], np.arange(4), jax.random.PRNGKey(0), plan).samples
    assert samples.shape == (4, 2) and np.all(np.abs(np.asarray(samples)) <= 1.0)


@pytest.fixture(scope="module")
def one_round(teacher_run, tmp_path_factory):
    """A finished one-round run (an 8 -> 4 step v-predicting student) of the toy teacher."""
    folder, ds = teacher_run
    out = str(tmp_path_factory.mktemp("one") / "run")
    settings = dataclasses.replace(SMALL, rounds=1, steps_per_round=2, student_prediction="v")
    distill_rounds.distill(out, folder, settings, dataset=ds)
    return out


def test_distilled_solver_is_ddim_on_the_students_grid(one_round):
    """``--sampler distilled`` equals DDIM (eta = 0) written out in float64 numpy on the
    student's x0, step by step on its grid (one network call per step, w fed to the network)."""
    st = generation.load_for_sampling(one_round, steps=4)
    grid = list(distillation.start_grid(40, 8)[::2])
    plan = plans.for_checkpoint(st, {"w": 0.7})
    assert plan.timesteps == tuple(grid) and plan.steps == 4
    labels, key = np.array([0, 3, 5]), jax.random.PRNGKey(4)  # 5: unconditional
    got = np.asarray(generation.generate(*st[:4], labels, key, plan).samples)
    abar = np.cumprod(1 - get_betas(st.config.schedule, 40))
    z = np.asarray(jax.random.normal(jax.random.split(key)[0], (3, 2)), np.float64)
    levels = list(abar[grid]) + [1.0]
    for n, t in enumerate(grid):
        out_ = st.model.apply({"params": st.params}, jnp.asarray(z, jnp.float32),
                              jnp.full(3, t), jnp.asarray(labels), w=jnp.full(3, 0.7))
        alpha, sigma = np.sqrt(levels[n]), np.sqrt(1 - levels[n])
        x0 = np.clip(alpha * z - sigma * np.asarray(out_, np.float64), -1, 1)  # v = alpha eps -
        eps = (z - alpha * x0) / sigma  # sigma x0, so x0 = alpha z - sigma v
        z = np.sqrt(levels[n + 1]) * x0 + np.sqrt(1 - levels[n + 1]) * eps
    assert np.all(np.abs(z) < 0.99)  # (not saturated by the clipping, so the check has teeth)
    np.testing.assert_allclose(got, z, atol=1e-4)
    other_w = generation.generate(*st[:4], labels, key, plan.replace(w=0.0)).samples
    assert not np.allclose(np.asarray(other_w), got, atol=1e-3)  # w reaches the network


def test_distilled_plans_refuse_what_a_student_cannot_do(one_round, teacher_run, caplog):
    st = generation.load_for_sampling(one_round)
    config = st.config
    for kw, match in (
        (dict(steps=2), "takes 4 steps, not 2"),
        (dict(eta=0.5), "drop --eta"),
        (dict(guidance_interval=(0, 20)), "drop --guidance_interval"),
        (dict(guidance_schedule="linear"), "drop --guidance_schedule"),
        (dict(spacing="logsnr"), "drop --timesteps and --spacing"),
        (dict(solver="ddim"), "only --sampler distilled can sample"),
    ):
        with pytest.raises(ValueError, match=match):
            plans.for_checkpoint(st, kw)
    with pytest.raises(ValueError, match="samples a distilled student"):
        plans.resolve(config, solver="distilled")
    teacher = generation.load_for_sampling(teacher_run[0])
    with pytest.raises(ValueError, match="samples a distilled student"):
        plans.for_checkpoint(teacher, {"solver": "distilled"})
    # a student's plan on the teacher's network, and a teacher's plan on the student's
    plan = plans.for_checkpoint(st)
    with pytest.raises(ValueError, match="does not fit this network"):
        generation.generate(*teacher[:4], np.arange(2), jax.random.PRNGKey(0), plan)
    with pytest.raises(ValueError, match="does not fit this network"):
        generation.generate(*st[:4], np.arange(2), jax.random.PRNGKey(0),
                            plans.resolve(config, solver="ddim", steps=4))
    with pytest.raises(checkpoints.CheckpointError, match=r"students of \[4\] steps, not 8"):
        generation.load_for_sampling(one_round, steps=8)
    with caplog.at_level("WARNING", logger="diffusion_jax"):
        plans.for_checkpoint(st, {"w": 3.0})
    assert "outside [0, 2]" in caplog.text


def test_rounds_of_their_own_lengths(teacher_run, tmp_path):
    """steps_per_round per round: round r runs (and decays its learning rate over) its own
    length; a round not started yet may be lengthened on resume, to the result of a run given
    that length from the start; a started round's length is fixed."""
    folder, ds = teacher_run
    given = dataclasses.replace(SMALL, steps_per_round=(6, 4))
    straight = str(tmp_path / "straight")
    distill_rounds.distill(straight, folder, given, dataset=ds)
    assert checkpoints.saved_steps(checkpoints.round_folder(straight, 1))[-1] == 4
    assert checkpoints.students(straight) == {
        4: checkpoints.round_folder(straight, 0), 2: checkpoints.round_folder(straight, 1)
    }
    # the run's round 0 at its length, stopped before round 1 starts; then round 1 lengthened
    resumed = str(tmp_path / "resumed")
    assert distill_rounds.distill(resumed, folder, SMALL, dataset=ds, stop_after=6).interrupted
    assert not checkpoints.saved_steps(checkpoints.round_folder(resumed, 1))
    assert distill_rounds.distill(resumed, folder, given, dataset=ds) == (
        checkpoints.round_folder(resumed, 1), 2, False
    )
    for r in (0, 1):
        _same_params(_ema(straight, r), _ema(resumed, r))
    assert json.load(open(os.path.join(resumed, "distill.json")))["settings"][
        "steps_per_round"] == [6, 4]
    # round 1 has started (and finished): its length, and round 0's, are fixed
    for lengths in ((6, 5), (5, 4), 6):
        with pytest.raises(checkpoints.CheckpointError, match=r"settings \(steps_per_round\)"):
            changed = dataclasses.replace(SMALL, steps_per_round=lengths)
            distill_rounds.distill(resumed, folder, changed, dataset=ds)
    # another setting changed along with an unstarted round's length: refused too
    fresh = str(tmp_path / "fresh")
    distill_rounds.distill(fresh, folder, SMALL, dataset=ds, stop_after=6)
    with pytest.raises(checkpoints.CheckpointError, match=r"settings \(lr, steps_per_round\)"):
        distill_rounds.distill(fresh, folder, dataclasses.replace(given, lr=0.5), dataset=ds)


DISTILL_ON_DEVICES = """
import dataclasses, json, sys, jax, numpy as np
from diffusion_jax import distill_rounds, distillation, generation
from diffusion_jax.data import Dataset
teacher, out, data, settings = sys.argv[1:5]
assert jax.local_device_count() == 2, jax.local_devices()
d = np.load(data)
ds = Dataset("toy2d", d["x"], d["y"], d["x"], d["y"], 8)
settings = distillation.DistillSettings(**json.loads(settings))
assert distill_rounds.distill(out, teacher, settings, dataset=ds, stop_after=9).interrupted
distill_rounds.distill(out, teacher, settings, dataset=ds)  # resumed on the mesh
"""


def test_distillation_over_two_devices_matches_one(teacher_run, tmp_path):
    """On a data-parallel mesh of two (CPU) devices the batch is split, the draws are the same,
    and the students equal the one-device run's up to the order of float sums."""
    import subprocess
    import sys

    folder, ds = teacher_run
    np.savez(tmp_path / "data.npz", x=ds.train_x, y=ds.train_y)
    one = str(tmp_path / "one")
    distill_rounds.distill(one, folder, SMALL, dataset=ds)
    two = str(tmp_path / "two")
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
           + " --xla_force_host_platform_device_count=2"}
    done = subprocess.run(
        [sys.executable, "-c", DISTILL_ON_DEVICES, folder, two, str(tmp_path / "data.npz"),
         json.dumps(dataclasses.asdict(SMALL))],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for r in (0, 1):
        _same_params(_ema(one, r), _ema(two, r), rtol=1e-4, atol=1e-6)


def test_bad_inputs(teacher_run, tmp_path):
    folder, ds = teacher_run
    for changes, match in (
        (dict(start_steps=12, rounds=3), "multiple of 2\\*\\*rounds = 8"),
        (dict(start_steps=7, rounds=1), "multiple of 2\\*\\*rounds = 2"),
        (dict(w_min=2.0, w_max=1.0), "w range is reversed"),
        (dict(w_min=-1.0), "w_min must be >= 0"),
        (dict(steps_per_round=0), "steps_per_round must be an integer >= 1"),
        (dict(steps_per_round=(6, 0)), r"steps_per_round \(round 1\) must be an integer >= 1"),
        (dict(steps_per_round=(6, 6, 6)), "gives 3 lengths for 2 rounds"),
        (dict(student_prediction="mean"), "student_prediction must be one of"),
        (dict(start_spacing="log"), "start_spacing must be one of"),
    ):
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(SMALL, **changes).validate()
    with pytest.raises(ValueError, match="the default is the shipped recipe's, for 5"):
        distillation.DistillSettings(start_steps=8, rounds=3).validate()  # default lengths
    with pytest.raises(checkpoints.CheckpointError, match="no checkpoint at"):
        distill_rounds.distill(str(tmp_path / "o"), str(tmp_path / "missing"), SMALL, dataset=ds)
    with pytest.raises(ValueError, match=r"start_steps must be in \[2, 40\]"):
        distill_rounds.distill(str(tmp_path / "o"), folder,
                               dataclasses.replace(SMALL, start_steps=64), dataset=ds)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(checkpoints.CheckpointError, match="not a distillation run"):
        distill_rounds.distill(str(other), folder, SMALL, dataset=ds)
    out = str(tmp_path / "run")
    distill_rounds.distill(out, folder, SMALL, dataset=ds, stop_after=1)
    with pytest.raises(checkpoints.CheckpointError, match=r"different settings \(seed\)"):
        distill_rounds.distill(out, folder, dataclasses.replace(SMALL, seed=1), dataset=ds)
    # a run recorded before start_spacing existed was uniform: resumed as such, refused as logsnr
    record_path = os.path.join(out, "distill.json")
    record = json.load(open(record_path))
    del record["settings"]["start_spacing"]
    json.dump(record, open(record_path, "w"))
    logsnr = dataclasses.replace(SMALL, start_spacing="logsnr")
    with pytest.raises(checkpoints.CheckpointError, match=r"different settings \(start_spacing\)"):
        distill_rounds.distill(out, folder, logsnr, dataset=ds)
    assert distill_rounds.distill(out, folder, SMALL, dataset=ds, stop_after=1).interrupted
    assert json.load(open(record_path))["settings"]["start_spacing"] == "uniform"
    with pytest.raises(checkpoints.CheckpointError, match="has no student yet"):
        generation.load_for_sampling(out)  # round 0 stopped at step 2 of 6
    assert generation.load_for_sampling(checkpoints.round_folder(out, 0)).step == 2


def test_command_interrupt_resume_and_errors(teacher_run, tmp_path):
    """distill.py: a bad flag value is one line and exit 2; SIGINT writes a checkpoint and exits
    130; the same command resumes from it; other flags in the same workdir are refused; an eps
    student starting at alpha ~ 0 is warned about."""
    import signal
    import subprocess
    import sys
    import time

    folder, _ = teacher_run
    script = os.path.join(os.path.dirname(__file__), "..", "distill.py")
    out = str(tmp_path / "out")
    common = [sys.executable, script, "--teacher", folder, "--workdir", out, "--start_steps", "8",
              "--rounds", "1", "--batch_size", "8", "--log_every", "1", "--checkpoint_every",
              "1000", "--student_prediction", "eps", "--steps_per_round", "4"]
    bad = subprocess.run(common + ["--w_min", "3", "--w_max", "1"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "w range is reversed" in bad.stderr
    assert not os.path.exists(out)
    long = common + ["--steps_per_round", "100000"]

    def interrupted_run(after: str) -> str:
        """The output of ``long`` sent SIGINT once a line containing ``after`` is printed."""
        proc = subprocess.Popen(long, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if after in line:
                time.sleep(0.5)
                proc.send_signal(signal.SIGINT)
                break
        text = "".join(seen) + proc.communicate(timeout=300)[0]
        assert proc.returncode == 130, text
        assert "checkpoint written" in text and "run the same command again" in text
        return text

    text = interrupted_run("round 0: step 2/")
    assert "consider --student_prediction v" in text
    folder_ = os.path.join(out, "round_0", "checkpoints")
    saved = max(int(d) for d in os.listdir(folder_) if d.isdigit())
    assert saved >= 2
    # the same command resumes from the checkpoint the signal wrote
    text = interrupted_run(f"round 0: step {saved + 1}/")
    assert f"8 -> 4 steps, step {saved}/100000" in text
    # other flags: refused, nothing changed
    again = subprocess.run(common + ["--steps_per_round", "5"], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 2 and "different settings (steps_per_round)" in again.stderr
