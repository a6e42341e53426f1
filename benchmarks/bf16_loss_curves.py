"""bfloat16 activations against float32: do the loss curves agree within seed-to-seed noise?

Trains three short runs of one preset, float32 (seed 0), bfloat16 (seed 0) and float32 (seed 1),
then compares the logged loss curves. The float32 pair with different seeds measures the noise a
difference has to be judged against (different initial parameters, data order and noise draws);
the bfloat16 run shares seed 0 with the first, so it differs from it only by the precision of its
activations. Speed ratios belong to ``benchmarks/benchmark.py`` (``--dtypes``), not to this script.

    JAX_PLATFORMS=cpu python benchmarks/bf16_loss_curves.py --root runs/bf16cmp --preset cpu \\
        --num_steps 400 --log_every 20

Runs that already exist under ``--root`` are resumed (or reused if finished), not overwritten.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

if __package__ in (None, ""):
    # Run as a file (python benchmarks/NAME.py), Python puts benchmarks/ on sys.path, not the
    # repository root; the root makes `benchmarks` (and diffusion_jax) importable either way.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import script_parser  # noqa: E402

RUNS = (("f32_s0", "float32", 0), ("bf16_s0", "bfloat16", 0), ("f32_s1", "float32", 1))


def read_losses(workdir: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, losses) from a run's metrics.jsonl; each loss is the mean over its interval."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return np.array([r["step"] for r in records]), np.array([r["loss"] for r in records])


def compare(curves: dict, tail: int) -> str:
    """A markdown table of the curves and a summary of the two differences."""
    steps = curves["f32_s0"][0]
    for name, (s, _) in curves.items():
        if not np.array_equal(s, steps):
            raise ValueError(f"run {name} logged other steps than f32_s0; use the same flags")
    loss = {name: c[1] for name, c in curves.items()}
    lines = ["| step | float32 seed 0 | bfloat16 seed 0 | float32 seed 1 |", "|---|---|---|---|"]
    for i, step in enumerate(steps):
        lines.append(
            f"| {step} | {loss['f32_s0'][i]:.4f} | {loss['bf16_s0'][i]:.4f} | "
            f"{loss['f32_s1'][i]:.4f} |"
        )
    skip = len(steps) // 10  # the first intervals' losses fall steeply; compare after them
    precision = np.abs(loss["bf16_s0"] - loss["f32_s0"])[skip:]
    seeds = np.abs(loss["f32_s1"] - loss["f32_s0"])[skip:]
    last = {k: float(np.mean(v[-tail:])) for k, v in loss.items()}
    lines += [
        "",
        f"Mean |difference| of the logged losses after step {steps[skip]}: bfloat16 vs float32 "
        f"(same seed) {precision.mean():.4f}, float32 seed 1 vs seed 0 {seeds.mean():.4f} "
        f"(largest: {precision.max():.4f} and {seeds.max():.4f}).",
        f"Mean loss over the last {tail} logged intervals: float32 {last['f32_s0']:.4f}, "
        f"bfloat16 {last['bf16_s0']:.4f}, float32 seed 1 {last['f32_s1']:.4f}.",
    ]
    return "\n".join(lines)


def plot(curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, label in (("f32_s0", "float32, seed 0"), ("bf16_s0", "bfloat16, seed 0")):
        ax.plot(*curves[name], label=label)
    ax.plot(*curves["f32_s1"], label="float32, seed 1", linestyle="--")
    ax.set(xlabel="step", ylabel="training loss", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--root", required=True, help="folder for the three run folders")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--num_steps", type=int, default=400)
    parser.add_argument("--log_every", type=int, default=20)
    parser.add_argument("--tail", type=int, default=5, help="logged intervals in the final mean")
    parser.add_argument("--plot", help="write the curves to this PNG (refuses to overwrite)")
    args = parser.parse_args(argv)
    if args.plot and os.path.exists(args.plot):
        parser.error(f"{args.plot} exists; remove it or choose another --plot path")

    from diffusion_jax import training
    from diffusion_jax.commands import errors

    curves = {}
    with errors.clean_errors("bf16_loss_curves.py"):
        for name, dtype, seed in RUNS:
            workdir = os.path.join(args.root, name)
            overrides = dict(
                dtype=dtype,
                seed=seed,
                num_steps=args.num_steps,
                log_every=args.log_every,
                sample_every=0,
                checkpoint_every=args.num_steps,
            )
            training.train(workdir, preset=args.preset, overrides=overrides, progress=False)
            curves[name] = read_losses(workdir)
    print(compare(curves, args.tail))
    if args.plot:
        plot(curves, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
