"""Evaluation protocol: metrics of generated samples next to real-data floors, and sweeps.

For a set of generated images with the labels they were asked for, :func:`evaluate_images`
reports the Frechet distance in the classifier's features against the real test images, the
conditional accuracy, per-class counts and the classifier Inception Score. Each comes with its
reference on real data, computed with the same classifier and the same sample count: the
distance between real training and real test images (the floor) and the score of real test
images. :func:`sweep` runs that over guidance weights and samplers/step counts and writes a
markdown table, JSON and plots.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import NamedTuple

import jax
import numpy as np

from diffusion_jax import classifier as classifier_lib
from diffusion_jax import data, datasets, generation, metrics, outputs, plans, solvers
from diffusion_jax.cli import parse_list
from diffusion_jax.evaluation_plots import plot_sweep
from diffusion_jax.plans import SamplingPlan

logger = logging.getLogger(__name__)


# A Frechet distance compares covariances, which need at least two samples; fewer would write
# NaN. (metrics.feature_statistics warns when the count is below the feature dimension.)
MIN_SAMPLES = 2


class SamplerSpec(NamedTuple):
    """A ``SOLVER:STEPS`` of ``--samplers``."""

    solver: str
    steps: int

    def __str__(self):
        return f"{self.solver}:{self.steps}"


def parse_samplers(text: str, num_timesteps: int) -> list[SamplerSpec]:
    """'dpmpp2m:10,ddim:50,ddpm' -> specs; a name alone means that sampler's default step count
    (``solvers.default_steps``: all T steps for ddpm)."""

    def spec(part: str) -> SamplerSpec:
        solver, _, steps = part.partition(":")
        if solver not in solvers.SOLVERS:
            raise ValueError(
                f"--samplers: unknown sampler {solver!r} in {part!r} "
                f"(one of {tuple(solvers.SOLVERS)})"
            )
        if solvers.get(solver).student and not steps:
            raise ValueError(f"--samplers: {solver} needs its step count, e.g. {solver}:4")
        try:
            k = int(steps) if steps else solvers.default_steps(solver, num_timesteps)
        except ValueError:
            raise ValueError(f"--samplers: {part!r} is not SAMPLER:STEPS") from None
        if not 1 <= k <= num_timesteps:
            raise ValueError(f"--samplers: steps must be in [1, {num_timesteps}], got {part!r}")
        return SamplerSpec(solver, k)

    return parse_list(text, spec, name="--samplers")


def check_images(images, expected_shape) -> np.ndarray:
    """Generated images -> float32 in [-1, 1]. Accepts uint8 [0, 255] or floats in [0, 1]."""
    images = np.asarray(images)
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(expected_shape):
        raise ValueError(
            f"samples have shape {images.shape}; the data set's images are (N, "
            f"{', '.join(map(str, expected_shape))})"
        )
    if len(images) == 0:
        raise ValueError("there are no samples (an array of shape (0, ...))")
    if len(images) < MIN_SAMPLES:
        raise ValueError(
            f"{len(images)} sample is too few: a Frechet distance needs at least {MIN_SAMPLES} "
            "(a covariance), and hundreds to mean much (sample.py --num 1000)"
        )
    if images.dtype == np.uint8:
        return data.to_model_range(images)
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(
            f"samples must be uint8 in [0, 255] or floats in [0, 1], got {images.dtype}"
        )
    bad = int(np.sum(~np.isfinite(images)))
    if bad:
        raise ValueError(
            f"samples hold {bad} NaN or infinite values (in {len(images)} images); "
            "they must be finite floats in [0, 1] or uint8"
        )
    if images.min() < 0 or images.max() > 1:
        raise ValueError(
            f"float samples must lie in [0, 1] (as sample.py writes them), got values in "
            f"[{images.min():.3g}, {images.max():.3g}]"
        )
    return (images * 2.0 - 1.0).astype(np.float32)


class Reference:
    """Real-data statistics for a classifier and data set, computed once per sample count."""

    def __init__(self, clf, dataset):
        self.clf, self.dataset = clf, dataset
        self.test_probs, self.test_feats = classifier_lib.predict(clf, dataset.test_x)
        self.train_probs, self.train_feats = classifier_lib.predict(clf, dataset.train_x)
        self._cache: dict[int, dict] = {}

    def floors(self, n: int) -> dict:
        """Real train vs real test with n samples each (test capped at its size)."""
        if n not in self._cache:
            n_test = min(n, len(self.test_feats))
            rng = np.random.default_rng(n)  # the same subsets for the same n
            tr = rng.choice(len(self.train_feats), min(n, len(self.train_feats)), replace=False)
            te = rng.choice(len(self.test_feats), n_test, replace=False)
            self._cache[n] = {
                "floor_fd": metrics.frechet_distance_of_features(
                    self.train_feats[tr], self.test_feats[te]
                ),
                "real_is": metrics.inception_score(self.test_probs[te]),
                "real_accuracy": metrics.conditional_accuracy(
                    self.test_probs[te], self.dataset.test_y[te]
                ),
                "floor_n": int(n_test),
                "test_index": te,
            }
        return self._cache[n]


def evaluate_images(reference: Reference, images, labels) -> dict:
    """Metrics of generated images (N, H, W, C) in [-1, 1] asked to be ``labels`` (N,)."""
    labels = np.asarray(labels)
    n = len(images)
    if n < MIN_SAMPLES:
        raise ValueError(f"{n} samples: a Frechet distance needs at least {MIN_SAMPLES}")
    probs, feats = classifier_lib.predict(reference.clf, images)
    floors = dict(reference.floors(n))
    test_index = floors.pop("test_index")
    row = {
        "n": n,
        "fd": metrics.frechet_distance_of_features(feats, reference.test_feats[test_index]),
        "accuracy": metrics.conditional_accuracy(probs, labels),
        "is": metrics.inception_score(probs),
        "class_counts": metrics.class_counts(probs, reference.dataset.num_classes),
    }
    # The floor compares real train to real test with the same count as the samples (capped at
    # the test set), and the samples' distance is to that same test subset.
    row.update(floors)
    return row


def sweep(
    workdir: str,
    guidance_plans: list[SamplingPlan],
    step_plans: list[SamplingPlan],
    *,
    per_class: int,
    seed: int,
    out: str,
    classifier_dir: str | None = None,
    classifier_epochs: int | None = None,
    batch_size: int = 1000,
    overwrite: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Guidance sweep (``guidance_plans``: one solver and step count, several ``w``) and step
    sweep (``step_plans``: several solvers and step counts at one ``w``) of the checkpoint in
    ``workdir``; writes ``out``/results.{md,json} and plots, all or nothing. A distillation
    run's folder as ``workdir``: each ``distilled`` plan samples the student of its steps."""
    opened = {}  # a distillation run's students, by steps

    def open_for(plan: SamplingPlan):
        steps = plan.steps if solvers.get(plan.solver).student else None
        if steps not in opened:
            opened[steps] = generation.open_checkpoint(workdir, plan)[0]
        return opened[steps]

    for plan in [*guidance_plans, *step_plans]:  # every plan fits its checkpoint, before any run
        plans.for_checkpoint(open_for(plan), plan)
    ckpt = open_for(guidance_plans[0] if guidance_plans else step_plans[0])
    config = ckpt.config
    if len(ckpt.data_shape) != 3:
        raise ValueError("evaluation applies to image data sets, not toy2d")
    names = [
        ("md", "results.md"),
        ("json", "results.json"),
        ("tradeoff", "fd_vs_is.png"),
        ("accuracy", "accuracy_vs_w.png"),
        ("steps", "fd_vs_nfe.png"),
    ]
    paths = outputs.prepare({k: os.path.join(out, f) for k, f in names}, overwrite)
    dataset = datasets.load_dataset(config)
    clf = classifier_lib.get_classifier(dataset, classifier_dir, epochs=classifier_epochs)
    reference = Reference(clf, dataset)
    labels = np.repeat(np.arange(config.num_classes), per_class)
    runs = list(dict.fromkeys([*guidance_plans, *step_plans]))
    calls = network_calls(runs, len(labels), batch_size)
    logger.info(
        f"this sweep makes {calls} network calls ({len(runs)} runs of {len(labels)} samples at "
        f"batch {batch_size}); on a CPU that can take hours: try --per_class 10 and fewer "
        "--w/--samplers first. The time it will take is printed after the first run."
    )
    bar = _bar(len(runs), progress)
    rows = []
    started = time.monotonic()
    for index, plan in enumerate(runs):
        chunks = []
        for i in range(0, len(labels), batch_size):
            key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
            result = generation.generate(
                *open_for(plan)[:4], labels[i : i + batch_size], key, plan
            )
            chunks.append(np.asarray(result.samples))
        row = {
            "sampler": plan.solver,
            "steps": plan.steps,
            "spacing": plan.spacing,
            "x0": plan.x0,
            # network evaluations per sample: one denoiser call per step (on the doubled batch
            # when guided)
            "nfe": plan.steps,
            "w": plan.w,
            **evaluate_images(reference, np.concatenate(chunks), labels),
        }
        rows.append(row)
        if index == 0 and len(runs) > 1:
            done = network_calls(runs[:1], len(labels), batch_size)
            left = (time.monotonic() - started) / done * (calls - done)
            logger.info(f"the other {len(runs) - 1} runs will take about {left / 3600:.1f} h")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(fd=f"{row['fd']:.2f}", acc=f"{row['accuracy']:.3f}")
    if bar is not None:
        bar.close()
    header = {
        "workdir": os.path.abspath(workdir),
        "checkpoint_step": ckpt.step,  # (of a distillation run: the first plan's round's)
        "dataset": dataset.name,
        "classifier_test_accuracy": clf.test_accuracy,
        "per_class": per_class,
        "seed": seed,
        "device": jax.devices()[0].device_kind,
        "sampler_options": shared_options(runs),
    }
    first = guidance_plans[0] if guidance_plans else runs[0]
    steps_w = step_plans[0].w if step_plans else first.w
    with outputs.staged(paths, overwrite) as tmp:
        with open(tmp["json"], "w") as f:
            f.write(to_json({**header, "rows": rows}))
        with open(tmp["md"], "w") as f:
            f.write(markdown_table(rows, header))
        plot_sweep(rows, SamplerSpec(first.solver, first.steps), steps_w, tmp)
    for path in paths.values():
        logger.info(f"wrote {path}")
    return rows


# the fields of a plan that each row of a sweep names itself
_ROW_FIELDS = ("solver", "steps", "spacing", "timesteps", "x0", "w")


def shared_options(runs: list[SamplingPlan]) -> dict:
    """The plan fields the rows do not name that all ``runs`` share (e.g. eta, variance)."""
    fields = [dataclasses.asdict(p) for p in runs]
    return {
        k: v
        for k, v in fields[0].items()
        if k not in _ROW_FIELDS and v is not None and all(f[k] == v for f in fields)
    }


def network_calls(runs: list[SamplingPlan], n: int, batch_size: int) -> int:
    """Denoiser calls of sampling ``n`` images per run (plans, or anything with ``steps``) in
    batches of ``batch_size``: one per step and batch (a guided batch is one call on twice the
    images)."""
    return sum(run.steps for run in runs) * -(-n // batch_size)


def to_json(obj) -> str:
    """``obj`` as strict JSON: a NaN or infinite number becomes null (with a warning naming
    it), never the bare ``NaN`` that JSON readers refuse."""

    def clean(x, where):
        if isinstance(x, dict):
            return {k: clean(v, f"{where}.{k}" if where else k) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, float) and not np.isfinite(x):
            logger.warning(f"WARNING: {where} is {x}; written as null")
            return None
        return x

    return json.dumps(clean(obj, ""), indent=1, allow_nan=False)


def markdown_table(rows: list[dict], header: dict) -> str:
    lines = [
        f"Checkpoint `{header['workdir']}` step {header['checkpoint_step']}, data "
        f"`{header['dataset']}`, {header['per_class']} samples per class, seed {header['seed']}, "
        f"device {header['device']}. "
        f"Classifier test accuracy {header['classifier_test_accuracy']:.4f}."
        + (
            f" Sampler options: {header['sampler_options']}."
            if header.get("sampler_options")
            else ""
        ),
        "",
        "FD: Frechet distance in the classifier's features to the real test set; floor: the same "
        "between real training and real test images with the same count (capped at the test set).",
        "",
        "| sampler | NFE | spacing | x0 | w | n | FD | FD floor | accuracy | IS | IS real test |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sampler']} | {r['nfe']} | {r['spacing']} | {r['x0']} | {r['w']:g} | "
            f"{r['n']} | {r['fd']:.3f} | "
            f"{r['floor_fd']:.3f} | {r['accuracy']:.4f} | {r['is']:.3f} | {r['real_is']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def evaluate_npz(
    path: str,
    config,
    *,
    classifier_dir: str | None = None,
    classifier_epochs: int | None = None,
) -> dict:
    """Metrics of the samples in an ``.npz`` written by sample.py (``samples``, ``labels``)."""
    samples, labels = read_npz(path)
    dataset = datasets.load_dataset(config)
    images = check_images(samples, dataset.train_x.shape[1:])
    labels = check_labels(labels, len(images), dataset.num_classes, config.null_label, path)
    clf = classifier_lib.get_classifier(dataset, classifier_dir, epochs=classifier_epochs)
    return evaluate_images(Reference(clf, dataset), images, labels)


def read_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(samples, labels)`` of an ``.npz`` file; ValueError saying what is wrong with it."""
    import zipfile
    import zlib

    unreadable = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError(f"{path!r} is an empty file, not an .npz of samples")
    if os.path.isfile(path):
        with open(path, "rb") as f:
            head = f.read(512)
        # numpy loads anything that is neither a zip nor a .npy as a pickle and refuses it with
        # "allow_pickle=False" advice, which would mislead: name what the file is instead
        if not head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY")):
            raise ValueError(
                f"{path!r} is not an .npz archive (it starts like {_describe(head)}); expected "
                "an .npz with 'samples' (N, H, W, C) and 'labels' (N,), as sample.py writes it"
            )
    try:
        npz = np.load(path)
    except unreadable as e:
        raise ValueError(f"cannot read {path!r} as an .npz: {e}") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{path!r} holds a single array, not an .npz archive; write it with sample.py or "
            "np.savez(path, samples=..., labels=...)"
        )
    with npz:
        for key in ("samples", "labels"):
            if key not in npz.files:
                raise ValueError(
                    f"{path!r} has no {key!r} array (has {npz.files}); write it with "
                    "sample.py or np.savez(path, samples=..., labels=...)"
                )
        try:
            return np.asarray(npz["samples"]), np.asarray(npz["labels"])
        except unreadable as e:
            raise ValueError(f"cannot read the arrays of {path!r}: {e}") from e


def _describe(head: bytes) -> str:
    """A few words on what the first bytes of a file look like (for error messages)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"binary data {head[:8]!r}"
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"text: {first!r}"


def check_labels(labels, n: int, num_classes: int, null_label: int, path: str) -> np.ndarray:
    """The labels of ``n`` samples: integers in [0, num_classes), else ValueError naming the
    offending values (``null_label`` marks unconditional samples, which cannot be scored)."""
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"{path!r}: {n} samples but labels of shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{path!r}: labels must be integer class indices in [0, {num_classes}), got "
            f"{labels.dtype} values such as {labels[:3].tolist()}"
        )
    outside = (labels < 0) | (labels >= num_classes)
    if outside.any():
        values = np.unique(labels[outside]).tolist()
        raise ValueError(
            f"{path!r}: labels must be in [0, {num_classes}) (the data set's classes), got "
            f"{int(outside.sum())} outside it, values {values[:5]}"
            + ("..." if len(values) > 5 else "")
            + (
                f" ({null_label} marks unconditional samples, which have no class to score)"
                if null_label in values
                else ""
            )
        )
    return labels


def _bar(total, enabled):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="run", dynamic_ncols=True)
