"""How to sample, as one value: a :class:`SamplingPlan` is resolved once (from a command's flags
or a config, :func:`resolve`) and passed down to whatever draws the samples.

A plan names the solver (the update rule, ``solvers.SOLVERS``), its time grid (``steps`` placed
by ``spacing``, or an explicit list of ``timesteps``), the noise (``eta``, ``variance``), what is
done to the predicted x0 (``x0``, ``threshold_quantile``) and the guidance (``w``, an interval
of timesteps and a schedule, :mod:`diffusion_jax.guidance`). It is frozen and checked when made;
:meth:`SamplingPlan.schedule`, :meth:`SamplingPlan.settings` and
:meth:`SamplingPlan.chain_options` turn it into what :func:`diffusion_jax.samplers.prepare_chain`
takes.

Words: the update rule is a *solver* in the library (``SamplingPlan.solver``,
``SamplerSettings.solver``, ``solvers.SOLVERS``); the commands keep the user-facing *sampler*
(``--sampler``, with ``--solver`` as an alias; the config's ``sampler`` field; the ``sampler``
column of evaluation tables), which names the same thing.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

from diffusion_jax import guidance, samplers, solvers
from diffusion_jax.schedules import SPACINGS, Schedule, max_steps, on_timesteps, respace

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
    """Everything about how to sample, resolved (no field left to a default decided elsewhere).

    solver: a name in ``solvers.SOLVERS``. steps: the chain's length (network calls per sample;
    with explicit ``timesteps``, their count). spacing: ``schedules.SPACINGS``, where ``steps``
    go. timesteps: an explicit time grid instead, distinct training timesteps, decreasing (the
    noisiest first, e.g. ``(999, 600, 300, 0)``). eta: DDIM noise in [0, 1]. variance:
    ``solvers.VARIANCES``, for ancestral steps. x0: ``solvers.X0_MODES``; threshold_quantile:
    the quantile of ``x0="threshold"``. w: guidance weight >= 0; guidance_interval: (t_lo, t_hi)
    training timesteps outside which there is no guidance (None = everywhere);
    guidance_schedule: ``guidance.SCHEDULES``.
    """

    solver: str
    steps: int
    spacing: str = "uniform"
    timesteps: tuple[int, ...] | None = None
    eta: float = 0.0
    variance: str = "small"
    x0: str = "clip"
    threshold_quantile: float = solvers.THRESHOLD_QUANTILE
    w: float = 0.0
    guidance_interval: tuple[int, int] | None = None
    guidance_schedule: str = "constant"

    def __post_init__(self):
        solvers.get(self.solver)
        if self.spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {self.spacing!r}")
        if self.timesteps is not None:
            t = tuple(int(v) for v in self.timesteps)
            if not t or min(t) < 0 or any(a <= b for a, b in zip(t, t[1:], strict=False)):
                raise ValueError(
                    "timesteps must be distinct training timesteps >= 0 in decreasing order "
                    f"(noisiest first), e.g. 999,600,300,0; got {self.timesteps!r}"
                )
            object.__setattr__(self, "timesteps", t)
            object.__setattr__(self, "steps", len(t))
        _check_int("steps", self.steps, 1)
        _check_number("eta", self.eta, 0.0, 1.0)
        _check_number("w", self.w, 0.0, math.inf)
        if not 0.0 < float(self.threshold_quantile) <= 1.0:
            raise ValueError(
                f"threshold_quantile must be in (0, 1], got {self.threshold_quantile!r}"
            )
        if self.variance not in solvers.VARIANCES:
            raise ValueError(f"variance must be one of {solvers.VARIANCES}, got {self.variance!r}")
        solvers.x0_settings(self.x0)  # checks the mode
        if self.guidance_schedule not in guidance.SCHEDULES:
            raise ValueError(
                f"guidance_schedule must be one of {guidance.SCHEDULES}, "
                f"got {self.guidance_schedule!r}"
            )
        if self.guidance_interval is not None:
            object.__setattr__(
                self, "guidance_interval", tuple(int(v) for v in self.guidance_interval)
            )
        for name in ("eta", "w", "threshold_quantile"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "steps", int(self.steps))

    def replace(self, **changes) -> SamplingPlan:
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)

    def check(self, num_timesteps: int) -> SamplingPlan:
        """ValueError unless the plan fits a model trained with T = ``num_timesteps``."""
        T = int(num_timesteps)
        if self.timesteps is not None and max(self.timesteps) > T - 1:
            raise ValueError(
                f"timesteps must be in [0, {T - 1}] (the model was trained with T={T}), "
                f"got {self.timesteps}"
            )
        _check_steps(self.steps, T)
        if self.guidance_interval is not None:
            guidance.check_interval(self.guidance_interval, T)
        return self

    def schedule(self, name: str, num_timesteps: int) -> Schedule:
        """The chain this plan walks on the training schedule ``(name, T)``."""
        self.check(num_timesteps)
        if self.timesteps is None:
            return respace(name, num_timesteps, self.steps, self.spacing)
        return on_timesteps(name, num_timesteps, self.timesteps)

    def settings(self, prediction: str, **fields) -> samplers.SamplerSettings:
        """The compile-time :class:`~diffusion_jax.samplers.SamplerSettings` of this plan for a
        network predicting ``prediction``; ``fields`` add others (``num_snapshots``, ``unroll``)."""
        return samplers.SamplerSettings(
            solver=self.solver,
            variance=self.variance,
            prediction=prediction,
            **solvers.x0_settings(self.x0, self.threshold_quantile),
            **fields,
        )

    def chain_options(self, schedule: Schedule, num_timesteps: int) -> dict:
        """The guidance and noise keywords of ``samplers.prepare_chain`` for ``schedule`` (the
        chain of :meth:`schedule`): ``w``, ``eta`` and ``guidance_scale``."""
        scale = None
        if self.guidance_interval is not None or self.guidance_schedule != "constant":
            scale = guidance.guidance_scale(
                np.asarray(schedule.timesteps),
                num_timesteps,
                self.guidance_interval,
                self.guidance_schedule,
            )
        return dict(w=self.w, eta=self.eta, guidance_scale=scale)

    def tag(self) -> str:
        """A file-name fragment naming every choice that differs from the solver's defaults
        (the guidance weight aside), e.g. ``dpmpp2m20`` or ``ddim50_eta0.5_quadratic_x0none``."""
        solver = solvers.get(self.solver)
        tag = solver.tag(self.steps, self.eta)
        if self.timesteps is not None and not solver.student:  # a student's grid is its own
            tag += "_t" + "-".join(map(str, self.timesteps))
        elif self.spacing != solver.spacing:
            tag += f"_{self.spacing}"
        if self.variance != "small":
            tag += f"_{self.variance}"
        if self.x0 != "clip":
            tag += f"_x0{self.x0}"
        if self.x0 == "threshold" and self.threshold_quantile != solvers.THRESHOLD_QUANTILE:
            tag += f"_q{self.threshold_quantile:g}"
        if self.guidance_interval is not None:
            tag += "_gi{},{}".format(*self.guidance_interval)
        if self.guidance_schedule != "constant":
            tag += f"_g{self.guidance_schedule}"
        return tag


def resolve(
    config,
    *,
    solver: str | None = None,
    steps: int | None = None,
    spacing: str | None = None,
    timesteps=None,
    w: float | None = None,
    student: dict | None = None,
    **fields,
) -> SamplingPlan:
    """The plan for a model trained with ``config``, defaults filled in and checked.

    solver: the config's ``sampler``. steps: the config's ``sample_steps`` when the solver is the
    config's own, else the solver's default (all T steps for ``ddpm``), never more than the
    spacing can place. spacing: the one the solver is meant for (``Solver.spacing``). w: the
    config's ``guidance``. ``fields``: the other :class:`SamplingPlan` fields. ``student``: the
    ``distill`` record of a distilled student (``Checkpoint.distill``), which is sampled with
    the ``distilled`` solver (the default then) on its own time grid (:func:`student_plan`).
    """
    if student is not None or (solver is not None and solvers.get(solver).student):
        if timesteps is not None or spacing is not None:
            raise ValueError(
                "a distilled student walks the time grid it was distilled for: drop --timesteps "
                "and --spacing"
            )
        return student_plan(config, student, solver=solver, steps=steps, w=w, **fields)
    solver = config.sampler if solver is None else solver
    spacing = solvers.get(solver).spacing if spacing is None else spacing
    T = config.num_timesteps
    if timesteps is not None:
        steps = len(timesteps)
    elif steps is None:
        own = solver == config.sampler
        steps = config.sample_steps if own else solvers.default_steps(solver, T)
        if spacing in SPACINGS:  # a default never asks for more steps than the spacing can place
            steps = min(steps, max_steps(config.schedule, T, spacing))
    if timesteps is None:
        _check_steps(steps, T)
    plan = SamplingPlan(
        solver=solver,
        steps=steps,
        spacing=spacing,
        timesteps=None if timesteps is None else tuple(timesteps),
        w=config.guidance if w is None else w,
        **fields,
    )
    return plan.check(T)


def student_plan(
    config, student: dict | None, *, solver=None, steps=None, w=None, **fields
) -> SamplingPlan:
    """The plan of a distilled student (``student``: its ``distill`` record): the ``distilled``
    solver on the record's timesteps, deterministic, with w (default: the config's) fed to the
    network. ValueError for what a student cannot do (another solver, another step count, eta,
    a guidance interval or schedule); a warning for w outside the range it learnt."""
    solver = "distilled" if solver is None else solver
    _check_student_solver(solver, student)
    n = int(student["steps"])
    if steps is not None and int(steps) != n:
        raise ValueError(
            f"this student takes {n} steps, not {steps}: pass the distillation run's folder as "
            "--workdir, and --steps picks its round"
        )
    refused = {
        "--eta": fields.get("eta", 0.0) != 0,
        "--guidance_interval": fields.get("guidance_interval") is not None,
        "--guidance_schedule": fields.get("guidance_schedule", "constant") != "constant",
    }
    if any(refused.values()):
        raise ValueError(
            f"a distilled student's steps are deterministic and it takes one w for the whole "
            f"chain: drop {', '.join(k for k, v in refused.items() if v)}"
        )
    w = config.guidance if w is None else w
    lo, hi = float(student["w_min"]), float(student["w_max"])
    if not lo <= w <= hi:
        logger.warning(f"w={w:g} is outside [{lo:g}, {hi:g}], the weights this student learnt")
    plan = SamplingPlan(solver, n, timesteps=tuple(student["timesteps"]), w=w, **fields)
    return plan.check(config.num_timesteps)


def for_config(
    config, plan: SamplingPlan | dict | None = None, student: dict | None = None, **defaults
) -> SamplingPlan:
    """``plan`` for a model trained with ``config``: a :class:`SamplingPlan` (checked against
    it), a dict of :func:`resolve`'s keywords (e.g. ``{"solver": "ddim", "steps": 50}``), or
    None: :func:`resolve` with ``defaults`` (which a dict's keywords override). ``student``: the
    model's ``distill`` record if it is a distilled student (:func:`for_checkpoint` passes it)."""
    if isinstance(plan, SamplingPlan):
        if student is not None:  # (a student's plan without its record: generate checks
            _check_student_solver(plan.solver, student)  # that the network takes w)
            if plan.timesteps != tuple(student["timesteps"]):
                raise ValueError(
                    f"the plan's timesteps {plan.timesteps} are not the student's "
                    f"{tuple(student['timesteps'])}: resolve the plan with for_checkpoint"
                )
        return plan.check(config.num_timesteps)
    if plan is not None and not isinstance(plan, dict):
        raise TypeError(f"plan must be a SamplingPlan, a dict or None, got {type(plan).__name__}")
    return resolve(config, student=student, **{**defaults, **(plan or {})})


def for_checkpoint(ckpt, plan: SamplingPlan | dict | None = None, **defaults) -> SamplingPlan:
    """:func:`for_config` for a :class:`~diffusion_jax.checkpoints.Checkpoint` (a distilled
    student's record included; a student's own solver and steps replace ``defaults``')."""
    if ckpt.distill is not None:
        defaults = {k: v for k, v in defaults.items() if k not in ("solver", "steps")}
    return for_config(ckpt.config, plan, ckpt.distill, **defaults)


def _check_student_solver(solver: str, student: dict | None) -> None:
    """ValueError unless a student's solver samples a student's checkpoint and no other."""
    if student is None:
        raise ValueError(
            f"--sampler {solver} samples a distilled student: pass a distill.py run (or one of "
            "its round_R folders) as --workdir"
        )
    if not solvers.get(solver).student:
        raise ValueError(
            f"this checkpoint is a distilled {student['steps']}-step student, which only "
            f"--sampler distilled can sample (not {solver})"
        )


def _check_steps(steps, num_timesteps: int) -> None:
    T = num_timesteps
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
        raise ValueError(
            f"--steps must be in [1, {T}] (the model was trained with T={T}), got {steps}"
        )


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_number(name: str, value, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must be a finite number in [{low:g}, {high:g}], got {value!r}")
