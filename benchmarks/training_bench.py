"""The training section of benchmark.py: steps/s, images/s, FLOPs per step and the fraction of the
device's peak per preset, activation dtype and batch size, and the bfloat16 / float32 ratio."""

from __future__ import annotations

from benchmarks.common import (
    Report,
    compile_timed,
    flops_of,
    fmt,
    md_table,
    median_seconds,
    peak_for,
    percent,
)
from benchmarks.workloads import data_shape, synthetic_dataset, threaded, train_program

TRAIN_COLUMNS = (
    "preset",
    "dtype",
    "batch",
    "steps/dispatch",
    "compile s",
    "ms/step",
    "steps/s",
    "images/s",
    "GFLOP/image (fwd+bwd+opt)",
    "TFLOP/s",
    "peak TFLOP/s/device",
    "% of peak",
    "timed runs",
)


def train_config(preset: str, dtype: str, batch: int, steps_per_dispatch: int | None):
    from diffusion_jax import config as config_lib

    overrides = dict(batch_size=batch, dtype=dtype)
    if steps_per_dispatch is not None:
        overrides["steps_per_dispatch"] = steps_per_dispatch
    return config_lib.get_config(preset, **overrides)


def step_flops(compiled, num_devices: int) -> float | None:
    """FLOPs of one optimizer step, summed over the devices, from the timed program itself.

    The program runs its steps in a ``lax.fori_loop`` over a traced count (or, at one step per
    dispatch, as straight-line code); XLA's cost analysis counts a loop body once, whatever the
    trip count, so either way it gives one step: the forward pass, the backward pass, the
    optimizer (AdamW, clipping) and EMA updates, the batch gather and random draws (and, in the
    loop, zeroing the metric sums once). An SPMD program's cost analysis describes one device's
    share of the batch.
    """
    flops = flops_of(compiled)
    return None if flops is None else flops * num_devices


def unrolled(compiled_flops: float | None, lowered_flops: float | None) -> bool:
    """Whether the compiled program counts more than the traced one: the dispatch's loop over a
    chunk of steps (static trip count) unrolled by the compiler, which XLA may do on a GPU, so
    that its cost analysis counts several steps. The traced program counts each loop body once.
    """
    if not compiled_flops or not lowered_flops:
        return False
    return compiled_flops > 1.5 * lowered_flops


def bench_train(preset: str, dtype: str, batch: int, args, mesh, report: Report) -> dict:
    """Time one training configuration; returns a row's values."""
    import jax
    import jax.numpy as jnp

    from diffusion_jax import sharding

    config = train_config(preset, dtype, batch, args.steps_per_dispatch)
    sharding.check_batch_size(batch, mesh)
    # Synthetic data laid out on the devices as training.train lays out a real data set: one
    # shard per process, each device holding its shard's examples.
    num = max(args.num_examples, batch)
    synthetic = synthetic_dataset(config.num_classes, num, data_shape(config), args.seed)
    num_shards = jax.process_count()
    fn, state, train_x, train_y = train_program(config, synthetic, mesh, num_shards)

    steps = config.steps_per_dispatch
    count = jnp.int32(steps)
    compiled, compile_s = compile_timed(fn, state, train_x, train_y, count)
    label = f"train {preset} {dtype} batch {batch}"
    report.compiles.append((f"{label} ({steps} step(s)/dispatch)", compile_s))
    traced = flops_of(fn.lower(state, train_x, train_y, count))  # (no compile: a sanity check)
    # Each run takes the state the last one returned (the step donates its input state).
    median, runs = median_seconds(
        threaded(compiled, state, train_x, train_y, count), args.repeats, args.warmup
    )
    flops_step = step_flops(compiled, mesh.devices.size)
    if unrolled(flops_step and flops_step / mesh.devices.size, traced):
        report.add(
            f"**Warning ({label}):** the compiled dispatch counts {flops_step:.3g} FLOPs per "
            f"step against {traced * mesh.devices.size:.3g} in the traced program (its loop "
            "unrolled?): the FLOPs columns of this row use the traced count."
        )
        flops_step = traced * mesh.devices.size
    steps_per_s = steps / median
    return dict(
        preset=preset,
        dtype=dtype,
        batch=batch,
        steps=steps,
        compile_s=compile_s,
        runs=runs,
        step_ms=1e3 * median / steps,
        steps_per_s=steps_per_s,
        images_per_s=batch * steps_per_s,
        flops_step=flops_step,
        tflops=None if flops_step is None else flops_step * steps_per_s / 1e12,
    )


def train_row(r: dict, peak: float | None, peak_text: str, ndev: int) -> list:
    """One line of the training table from a result of :func:`bench_train`."""
    gflop_image = None if r["flops_step"] is None else r["flops_step"] / r["batch"] / 1e9
    return [
        r["preset"],
        r["dtype"],
        r["batch"],
        r["steps"],
        fmt(r["compile_s"], ".1f"),
        fmt(r["step_ms"], ".4g"),
        fmt(r["steps_per_s"], ".4g"),
        fmt(r["images_per_s"], ".4g"),
        fmt(gflop_image),
        fmt(r["tflops"], ".3g"),
        peak_text,
        percent(r["tflops"], None if peak is None else peak * ndev),
        r["runs"],
    ]


def train_section(args, report: Report) -> None:
    from diffusion_jax import sharding

    mesh = sharding.data_mesh()
    ndev = mesh.devices.size
    report.add(
        f"Synthetic data: {args.num_examples} uniform random examples in [-1, 1] of the preset's "
        f"shape with random labels, placed on a {ndev}-device data mesh as `training.train` "
        "places a data set (each batch is split over the devices). Times are per dispatch to "
        "completion (`jax.block_until_ready`); "
        "compile = lower + compile ahead of time. FLOPs per step from XLA's cost analysis of the "
        "timed program (its loop body, one step): forward + backward pass + optimizer and EMA "
        "update"
        + (f", summed over the {ndev} devices" if ndev > 1 else "")
        + ". Each row is printed as it finishes."
    )
    results = []
    with report.table(TRAIN_COLUMNS) as table:
        for preset in args.presets:
            for dtype in args.dtypes:
                peak, peak_text = peak_for(dtype, args.peak_tflops)
                for batch in args.train_batch_sizes:
                    cells = [preset, dtype, batch]
                    if batch % ndev:
                        reason = f"skipped: not divisible by the {ndev} devices"
                        table.add(cells + [reason] + [""] * 9)
                        continue
                    if not table.may_start(cells, f"train {preset} {dtype} batch {batch}"):
                        continue
                    r = bench_train(preset, dtype, batch, args, mesh, report)
                    results.append(r)
                    table.add(train_row(r, peak, peak_text, ndev))
    report.add(ratio_table(results))


def ratio_table(results: list[dict]) -> str:
    """bfloat16 / float32 training speed at equal preset and batch size."""
    by_key = {(r["preset"], r["batch"], r["dtype"]): r for r in results}
    rows = []
    for (preset, batch, dtype), r in by_key.items():
        base = by_key.get((preset, batch, "float32"))
        if dtype == "bfloat16" and base is not None:
            rows.append(
                [
                    preset,
                    batch,
                    fmt(base["images_per_s"], ".4g"),
                    fmt(r["images_per_s"], ".4g"),
                    f"{r['images_per_s'] / base['images_per_s']:.2f}x",
                ]
            )
    if not rows:
        return "bf16/f32 speed ratio: n/a (needs both --dtypes float32,bfloat16)"
    return "**bf16 / f32 training speed**\n\n" + md_table(
        ["preset", "batch", "f32 images/s", "bf16 images/s", "bf16/f32"], rows
    )
