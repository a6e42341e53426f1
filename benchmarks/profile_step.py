"""Where a train step's time goes: its convolutions, timed one by one, against the whole step.

XLA:CPU's profiler trace marks a convolution only when it is launched on the thread pool, not for
as long as it runs, so the trace cannot say how much of a step the convolutions take. This script
measures it instead: it walks the jaxpr of one train step (forward, backward, clipping, AdamW,
EMA), times every ``conv_general_dilated`` in it as a jitted program of its own, with its own
shapes, strides and padding, and sets their sum against the whole step. The convolutions of the
backward pass appear in that jaxpr as convolutions too, so they are counted. Rows are grouped by
the spatial size of the convolution's input and by role (forward, input gradient, kernel
gradient: told apart by the dimension numbers JAX's transpose rules give them).

    JAX_PLATFORMS=cpu python benchmarks/profile_step.py --config "cpu" \\
        --config "plain16: patch_size=1 channels=16 channel_mults=1,2,2 prediction=eps \\
        weighting=simple" --report docs/profile.md
"""

from __future__ import annotations

import collections
import functools
import os
import sys

if __package__ in (None, ""):
    # Run as a file (python benchmarks/NAME.py), Python puts benchmarks/ on sys.path, not the
    # repository root; the root makes `benchmarks` (and diffusion_jax) importable either way.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    finish_report,
    header,
    md_table,
    median_seconds,
    script_parser,
)
from benchmarks.workloads import RunSpec, synthetic_dataset, threaded, train_program  # noqa: E402


def median_time(fn, *args, repeats: int) -> float:
    """Median seconds of ``fn(*args)`` after one compiling and one warm-up call."""
    return median_seconds(functools.partial(fn, *args), repeats, warmup=2)[0]


def step_program(config):
    """``(jitted step, args)`` for one train step of ``config`` on synthetic data."""
    dataset = synthetic_dataset(config.num_classes, max(config.batch_size, 512))
    fn, state, train_x, train_y = train_program(config, dataset)
    return fn, (state, train_x, train_y, 1)


def convolutions(jaxpr) -> list:
    """Every conv_general_dilated equation in ``jaxpr`` and its sub-jaxprs."""
    from jax.extend.core import ClosedJaxpr, Jaxpr

    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            found.append(eqn)
        for value in eqn.params.values():
            subs = value if isinstance(value, list | tuple) else [value]
            for sub in subs:
                if isinstance(sub, ClosedJaxpr):
                    found += convolutions(sub.jaxpr)
                elif isinstance(sub, Jaxpr):
                    found += convolutions(sub)
    return found


def role(eqn) -> str:
    """forward, input gradient or kernel gradient, from the layouts the transpose rules use."""
    lhs, rhs, out = eqn.params["dimension_numbers"]
    if lhs == (0, 3, 1, 2) and rhs == (3, 2, 0, 1):
        return "forward"
    if lhs == (3, 0, 1, 2):
        return "kernel grad"
    return "input grad"


def profile(spec: RunSpec, repeats: int) -> dict:
    import jax

    from diffusion_jax import config as config_lib

    config = config_lib.get_config(spec.preset, **spec.overrides)
    fn, args = step_program(config)
    eqns = convolutions(jax.make_jaxpr(fn)(*args).jaxpr)  # (before the step donates args[0])
    total = median_seconds(threaded(fn, *args), repeats, warmup=2)[0]
    groups = collections.defaultdict(lambda: [0, 0.0, 0.0])  # count, seconds, GFLOP
    for eqn in eqns:
        lhs, rhs = (v.aval for v in eqn.invars)
        conv = jax.jit(lambda a, b, p=eqn.params: jax.lax.conv_general_dilated_p.bind(a, b, **p))
        a = jax.numpy.ones(lhs.shape, lhs.dtype)
        b = jax.numpy.ones(rhs.shape, rhs.dtype)
        seconds = median_time(conv, a, b, repeats=repeats)
        flops = conv.lower(a, b).compile().cost_analysis().get("flops", 0.0)
        lhs_spec = eqn.params["dimension_numbers"][0]
        size = lhs.shape[lhs_spec[2]]  # the spatial size of the convolution's input
        key = (size, role(eqn))
        groups[key][0] += 1
        groups[key][1] += seconds
        groups[key][2] += flops / 1e9
    return dict(spec=spec, config=config, total=total, groups=dict(groups))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = script_parser(__doc__)
    parser.add_argument("--config", action="append", default=None, help="'NAME: key=value ...'")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--report", help="markdown file to write (never overwritten)")
    args = parser.parse_args(argv)
    specs = [RunSpec.parse(t, "cpu") for t in (args.config or ["cpu"])]
    lines = header("Where a train step's time goes", argv, ("jax", "flax")) + [
        f"- medians of {args.repeats} runs after compilation and one warm-up",
    ]
    for spec in specs:
        result = profile(spec, args.repeats)
        rows, conv_total = [], 0.0
        for (size, kind), (count, seconds, gflop) in sorted(
            result["groups"].items(), key=lambda kv: (-kv[0][0], kv[0][1])
        ):
            conv_total += seconds
            rows.append(
                [
                    f"{size}x{size}",
                    kind,
                    count,
                    f"{seconds * 1e3:.1f}",
                    f"{100 * seconds / result['total']:.0f}%",
                    f"{gflop:.2f}",
                    f"{gflop / seconds:.1f}" if seconds else "n/a",
                ]
            )
        rest = result["total"] - conv_total
        rows.append(
            [
                "all",
                "convolutions",
                "",
                f"{conv_total * 1e3:.1f}",
                f"{100 * conv_total / result['total']:.0f}%",
                "",
                "",
            ]
        )
        rows.append(
            [
                "",
                "everything else (norms, swish, attention, loss, AdamW, EMA)",
                "",
                f"{rest * 1e3:.1f}",
                f"{100 * rest / result['total']:.0f}%",
                "",
                "",
            ]
        )
        lines += [
            "",
            f"## {spec.name} (preset {spec.preset}, {spec.describe_overrides()}; batch "
            f"{result['config'].batch_size})",
            "",
            f"Whole train step: {result['total'] * 1e3:.1f} ms.",
            "",
            md_table(
                ["input size", "role", "convs", "ms", "share of step", "GFLOP", "GFLOP/s"], rows
            ),
        ]
    finish_report(lines, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
