"""The plots of an evaluation sweep: FD against IS by guidance weight (labels placed where they
hide no other text), accuracy against w, and FD against network calls per sampler."""

from __future__ import annotations

from diffusion_jax import outputs


def plot_sweep(rows, guidance_spec, steps_w, paths) -> None:
    """Writes ``paths``['tradeoff'], ['accuracy'] and ['steps'] (PNG paths) from the rows of
    :func:`evaluation.sweep`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = [r for r in rows if (r["sampler"], r["steps"]) == tuple(guidance_spec)]
    g.sort(key=lambda r: r["w"])
    fig = tradeoff_figure(g, guidance_spec)
    with outputs.written(paths["tradeoff"]) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.2, 3.4))
    ax.plot([r["w"] for r in g], [r["accuracy"] for r in g], "o-")
    ax.set_xlabel("guidance w")
    ax.set_ylabel("conditional accuracy")
    ax.set_ylim(0, 1.02)
    fig.tight_layout()
    with outputs.written(paths["accuracy"]) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.2, 3.4))
    for solver in dict.fromkeys(r["sampler"] for r in rows):
        s = sorted(
            (r for r in rows if r["sampler"] == solver and r["w"] == steps_w),
            key=lambda r: r["nfe"],
        )
        if s:
            ax.plot([r["nfe"] for r in s], [r["fd"] for r in s], "o-", label=solver)
    if g:
        ax.axhline(g[0]["floor_fd"], ls="--", c="gray", lw=1, label="real train vs test")
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel("Frechet classifier distance")
    ax.set_title(f"w = {steps_w:g}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with outputs.written(paths["steps"]) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def tradeoff_figure(g: list[dict], guidance_spec):
    """FD against IS of the guidance sweep's rows ``g`` (sorted by w), each point labelled by
    its w where the label overlaps no other text (close points otherwise hide each other's)."""
    import matplotlib.pyplot as plt
    from matplotlib.transforms import Bbox

    fig, ax = plt.subplots(figsize=(4.6, 3.6), layout="constrained")
    ax.plot([r["is"] for r in g], [r["fd"] for r in g], "o-")
    if g:
        ax.axhline(g[0]["floor_fd"], ls="--", c="gray", lw=1, label="real train vs test")
        # above the axes: inside them it would cover the points of one sweep or another
        fig.legend(fontsize=8, loc="outside upper right", frameon=False)
    ax.set_xlabel("classifier Inception Score")
    ax.set_ylabel("Frechet classifier distance")
    ax.set_title(f"guidance trade-off ({guidance_spec})", fontsize=9)
    ax.margins(0.12)
    fig.canvas.draw()  # settles the layout, so that text extents are final
    renderer = fig.canvas.get_renderer()
    taken = [t.get_window_extent(renderer) for t in _texts(fig)]
    for r in g:  # the markers: a label must not hide a neighbouring point
        x, y = ax.transData.transform((r["is"], r["fd"]))
        taken.append(Bbox.from_extents(x - 4, y - 4, x + 4, y + 4))
    # offsets in points: right-above first, then the other corners and further out
    offsets = [(4, 4), (4, -11), (-4, 4), (-4, -11), (6, 12), (6, -20), (-6, 12), (-6, -20)]
    for r in g:
        for dx, dy in offsets:
            label = ax.annotate(
                f"w={r['w']:g}",
                (r["is"], r["fd"]),
                xytext=(dx, dy),
                textcoords="offset points",
                fontsize=8,
                ha="left" if dx > 0 else "right",
            )
            box = label.get_window_extent(renderer)
            frame = ax.get_window_extent(renderer)
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            if inside and not any(box.overlaps(b) for b in taken):
                break
            if (dx, dy) != offsets[-1]:
                label.remove()
        taken.append(box)
    return fig


def _texts(fig) -> list:
    """Every visible, non-empty text of ``fig`` (titles, axis and tick labels, annotations)."""
    return [
        t
        for t in fig.findobj(lambda a: hasattr(a, "get_text") and hasattr(a, "get_window_extent"))
        if t.get_visible() and t.get_text()
    ]
