"""The sampling sections of benchmark.py: throughput of the compiled chains (with the issue's
targets), the chain driven from Python against lax.scan, and lax.scan unroll factors."""

from __future__ import annotations

import functools
import time

from benchmarks.common import Report, fmt, is_oom, md_table, median_seconds, peak_for, percent
from benchmarks.sampling_programs import (
    Sampling,
    chain_program,
    chain_step_flops,
    sampler_batches,
)

MIN_TIMED_STEPS = 10
TARGET_SAMPLES = 10_000
METHOD_NAMES = {"ddpm": "ancestral", "ddim": "DDIM", "dpmpp2m": "DPM-Solver++(2M)"}
SAMPLE_COLUMNS = (
    "sampler",
    "steps",
    "w",
    "batch",
    "timed steps",
    "compile s",
    "s/batch (median)",
    "images/s",
    "ms/step",
    "GFLOP/image",
    "TFLOP/s",
    "peak TFLOP/s/device",
    "% of peak",
    "timed runs",
)


def time_sampler(s: Sampling, method, steps, guided, batch, args, report, previous=None) -> dict:
    """Time one chain. ``previous`` (the last result of the same sampler at a smaller batch)
    predicts the run time; beyond --run_budget_s a shorter chain is timed and scaled."""
    timed_steps = steps
    if previous is not None:
        per_step = previous["seconds"] / previous["timed_steps"]
        expected = per_step * steps * batch / previous["batch"]
        if expected > args.run_budget_s:
            timed_steps = max(
                min(steps, MIN_TIMED_STEPS), int(steps * args.run_budget_s / expected)
            )
    compiled, compile_s, call = chain_program(
        s, method, timed_steps, guided, batch, 1, args, report
    )
    seconds, runs = median_seconds(
        lambda: compiled(*call.args), args.repeats, args.warmup, args.run_budget_s
    )
    flops = chain_step_flops(s, compiled, method, guided, batch)
    full_s = seconds * steps / timed_steps
    return dict(
        method=method,
        steps=steps,
        guided=guided,
        batch=batch,
        timed_steps=timed_steps,
        compile_s=compile_s,
        seconds=seconds,
        runs=runs,
        full_s=full_s,
        images_per_s=batch / full_s,
        step_ms=1e3 * seconds / timed_steps,
        flops_image=None if flops is None else flops * steps / batch,
        tflops=None if flops is None else flops * timed_steps / seconds / 1e12,
    )


def capped_steps(s: Sampling, steps: int, notes: list[str], what: str) -> int:
    if steps > s.config.num_timesteps:
        notes.append(
            f"{s.name}: {what} capped at the preset's num_timesteps = {s.config.num_timesteps}"
        )
        return s.config.num_timesteps
    return steps


def sampling_section(args, report: Report, samplings: list[Sampling]) -> None:
    report.add(
        "Each sampler is the whole chain compiled as one `lax.scan` (`samplers.prepare_chain(...)"
        ".compile()`, the program `samplers.sample` runs), compiled ahead of time and timed to "
        "completion. "
        f"Guided: w = {args.guidance:g} with random labels (conditional and unconditional "
        "outputs from one denoiser call on the doubled batch); unguided: w = 0, the same labels. "
        "Ancestral = DDPM with the small posterior variance; DDIM with eta = 0; DPM-Solver++(2M) "
        "as sample.py runs it. GFLOP/image = XLA cost analysis of the timed chain program (its "
        "loop body: one reverse step, plus the initial noise) x steps / batch. Rows marked ~ "
        "were timed on a shorter chain of the same kind (column 'timed steps') and scaled to the "
        "full length. With several devices the batch is split over all of them (as "
        "`generation.generate` does), padded to a multiple of the device count. Each row is "
        "printed as it finishes."
    )
    modes = (True,) if args.guided_only else (True, False)
    for s in samplings:
        notes: list[str] = []
        steps_of = {
            m: capped_steps(s, getattr(args, f"{m}_steps"), notes, f"--{m}_steps")
            for m in args.samplers
        }
        report.add(f"### {s.name}")
        results = []
        with report.table(SAMPLE_COLUMNS) as table:
            batches = {g: sampler_batches(s, g, args, notes, report.may_start) for g in modes}
            for method in args.samplers:  # in the order given
                steps = steps_of[method]
                for guided in modes:
                    w_text = f"{args.guidance:g}" if guided else "0"
                    previous = None  # the last result at a smaller batch predicts the run time
                    for batch in batches[guided]:
                        cells = [METHOD_NAMES[method], steps, w_text, batch]
                        what = f"sample {s.name} {method}-{steps} w={w_text} batch {batch}"
                        if not table.may_start(cells, what):
                            continue
                        try:
                            r = time_sampler(
                                s, method, steps, guided, batch, args, report, previous
                            )
                        except Exception as e:  # e.g. the max batch, found with DDIM, for DDPM
                            if not is_oom(e):
                                raise
                            table.add(cells + ["out of memory"] + [""] * 9)
                            continue
                        previous = r
                        results.append(r)
                        table.add(sampler_row(r, s, args))
        for text in (
            targets_table(s, results, steps_of.get("ddpm"), steps_of.get("ddim")),
            guidance_check(s),
            flops_check(s),
            "\n".join(f"- note: {n}" for n in notes),
        ):
            if text:
                report.add(text)


def sampler_row(r: dict, s: Sampling, args) -> list:
    """One line of the sampling table from a result of :func:`time_sampler`; ~ marks figures
    scaled from a shorter chain."""
    peak, peak_text = peak_for(s.dtype, args.peak_tflops)
    mark = "~" if r["timed_steps"] < r["steps"] else ""
    return [
        METHOD_NAMES[r["method"]],
        r["steps"],
        f"{args.guidance:g}" if r["guided"] else "0",
        r["batch"],
        r["timed_steps"],
        fmt(r["compile_s"], ".1f"),
        fmt(r["full_s"], ".4g", mark),
        fmt(r["images_per_s"], ".4g", mark),
        fmt(r["step_ms"], ".4g"),
        fmt(None if r["flops_image"] is None else r["flops_image"] / 1e9),
        fmt(r["tflops"], ".3g"),
        peak_text,
        percent(r["tflops"], None if peak is None else peak * s.num_devices),
        r["runs"],
    ]


def targets_table(s: Sampling, results: list[dict], ddpm: int | None, ddim: int | None) -> str:
    """The issue's two targets (for an H100), measured or extrapolated from the rows above ("" if
    no row bears on them); ``ddpm``/``ddim``: the chains' steps (None: not run)."""
    rows = []
    for guided in (True, False):
        one = [r for r in results if r["method"] == "ddpm" and r["guided"] == guided]
        one = [r for r in one if r["batch"] == 1]
        if not one:
            continue
        r = one[0]
        latency = r["full_s"] * 1000 / ddpm
        exact = ddpm == 1000 and r["timed_steps"] == ddpm
        how = "measured" if exact else f"extrapolated from {r['timed_steps']} timed steps"
        rows.append(
            [
                f"1000 ancestral steps, 1 image, {'guided' if guided else 'unguided'}",
                f"{latency:.3g} s",
                how,
                "< 1 s",
                "yes" if latency < 1 else "no",
            ]
        )
    ddim_guided = [r for r in results if r["method"] == "ddim" and r["guided"]]
    if ddim_guided:
        best = max(ddim_guided, key=lambda r: r["images_per_s"])
        seconds = TARGET_SAMPLES / best["images_per_s"] * 50 / ddim
        if best["batch"] >= TARGET_SAMPLES and ddim == 50 and best["timed_steps"] == ddim:
            how = f"measured at batch {best['batch']} (scaled to {TARGET_SAMPLES})"
        else:
            how = (
                f"extrapolated from {best['images_per_s']:.4g} images/s at batch {best['batch']}"
                + (f", {best['timed_steps']} timed steps" if best["timed_steps"] < ddim else "")
                + (f", DDIM-{ddim} scaled to 50 steps" if ddim != 50 else "")
            )
        rows.append(
            [
                f"{TARGET_SAMPLES:,} guided DDIM-50 samples",
                f"{seconds:.3g} s",
                how,
                "< 15 s",
                "yes" if seconds < 15 else "no",
            ]
        )
    if not rows:
        return ""
    return f"**Targets ({s.name}; the targets are for one H100)**\n\n" + md_table(
        ["what", "time", "how", "target", "meets target here"], rows
    )


def guidance_check(s: Sampling) -> str:
    """Evidence from the compiled programs that a guided step calls the denoiser once, on the
    doubled batch: as many convolutions as an unguided step, and twice its FLOPs."""
    lines = []
    for (method, guided, batch), convs in sorted(s.step_convolutions.items()):
        other = (method, not guided, batch)
        if guided and other in s.step_convolutions and s.step_flops[other]:
            ratio = s.step_flops[(method, True, batch)] / s.step_flops[other]
            lines.append(
                f"- {method} batch {batch}: the compiled guided step has {convs} convolution ops, "
                f"the unguided one {s.step_convolutions[other]}; guided / unguided FLOPs = "
                f"{ratio:.3f}"
            )
    if not lines:
        return ""
    return "One denoiser call per guided step (the doubled batch):\n" + "\n".join(lines)


def flops_check(s: Sampling) -> str:
    """A warning ("" if none) where the samplers' FLOPs per step disagree by over 10% at one
    batch size and guidance: each calls the denoiser once per step, so XLA's cost analysis then
    counted a chain's loop iterations, not its body once, and the FLOPs columns are wrong."""
    found: dict = {}
    for (method, guided, batch), flops in s.step_flops.items():
        if flops:
            found.setdefault((guided, batch), {})[method] = flops
    bad = [
        f"{'guided' if guided else 'unguided'} batch {batch}: "
        + ", ".join(f"{m} {f / 1e9:.4g}" for m, f in per_method.items())
        for (guided, batch), per_method in sorted(found.items())
        if max(per_method.values()) > 1.1 * min(per_method.values())
    ]
    if not bad:
        return ""
    return (
        "**Warning: the FLOPs columns above are not per step.** GFLOP per reverse step differ "
        "between samplers that all call the denoiser once per step, so XLA's cost analysis did "
        "not count each chain's loop body once: " + "; ".join(bad)
    )


# ---------------------------------------------------------------- loop vs scan, unroll


def loop_section(args, report: Report, samplings: list[Sampling]) -> None:
    report.add(
        "Guided DDIM: the chain driven from Python, one jitted reverse step per dispatch "
        "(`samplers.sample_python_loop`, warmed up so compiling is excluded), against the "
        "compiled `lax.scan` chain (unroll 1). Medians of whole chains to completion."
    )
    columns = ("model", "DDIM steps", "batch", "Python loop ms", "lax.scan ms", "loop / scan")
    with report.table(columns) as table:
        for s in samplings:
            steps = min(args.ddim_steps, s.config.num_timesteps)
            for batch in args.loop_batch_sizes:
                cells = [s.name, steps, batch]
                if not table.may_start(cells, f"loop vs scan {s.name} batch {batch}"):
                    continue
                table.add(cells + loop_vs_scan(s, steps, batch, args, report))


def loop_vs_scan(s: Sampling, steps: int, batch: int, args, report: Report) -> list:
    """The last three cells of a row of the loop-vs-scan table: loop ms, scan ms, their ratio."""
    import jax

    from diffusion_jax import samplers

    # Both on one device: sample_python_loop does not split the batch.
    compiled, _, call = chain_program(
        s, "ddim", steps, True, batch, 1, args, report, one_device=True
    )
    scan_s, _ = median_seconds(functools.partial(compiled, *call.args), args.repeats, args.warmup)
    loop = functools.partial(samplers.sample_python_loop, call)
    start = time.perf_counter()
    jax.block_until_ready(loop())  # compiles the step (once per configuration)
    first_s = time.perf_counter() - start
    report.compiles.append(
        (f"python-loop step {s.name} ddim guided batch {batch} (+1 run)", first_s)
    )
    loop_s, _ = median_seconds(loop, args.repeats, max(args.warmup - 1, 0))
    return [fmt(1e3 * loop_s, ".4g"), fmt(1e3 * scan_s, ".4g"), f"{loop_s / scan_s:.2f}x"]


def unroll_section(args, report: Report, samplings: list[Sampling]) -> None:
    batch = args.unroll_batch_size
    report.add(
        f"Guided DDIM at batch {batch}: compile time and median run time of the lax.scan chain "
        "for each unroll factor (the results are identical)."
    )
    columns = ("model", "DDIM steps", "unroll", "compile s", "run ms (median)",
               f"speed vs unroll {args.unroll_factors[0]}")  # fmt: skip
    with report.table(columns) as table:
        for s in samplings:
            steps = min(args.ddim_steps, s.config.num_timesteps)
            base = None
            for unroll in args.unroll_factors:
                cells = [s.name, steps, unroll]
                if not table.may_start(cells, f"unroll {unroll} {s.name} batch {batch}"):
                    continue
                compiled, compile_s, call = chain_program(
                    s, "ddim", steps, True, batch, unroll, args, report
                )
                seconds, _ = median_seconds(
                    functools.partial(compiled, *call.args), args.repeats, args.warmup
                )
                base = base or seconds
                speed = f"{base / seconds:.2f}x"
                table.add(cells + [fmt(compile_s, ".2f"), fmt(1e3 * seconds, ".4g"), speed])
