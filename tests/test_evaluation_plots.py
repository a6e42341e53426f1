"""The sweep's plots: the FD-IS trade-off labels every point without text over text."""

import itertools

import matplotlib
import pytest

from diffusion_jax import evaluation, evaluation_plots

matplotlib.use("Agg")

# (w, IS, FD) of docs/RESULTS.md's mnist5k cpu sweep: w = 0.375 and 0.5 lie 0.1 IS apart, and
# their labels overlapped in the plot the docs showed (issue 25)
CLOSE = [(0, 8.895, 14.661), (0.25, 9.389, 6.565), (0.375, 9.609, 5.876), (0.5, 9.708, 6.413)]
CLOSE += [(1, 9.932, 15.107), (2, 9.974, 36.354)]


def rows(points):
    return [
        dict(sampler="ddim", steps=50, w=w, fd=fd, floor_fd=7.029, **{"is": s})
        for w, s, fd in points
    ]


@pytest.mark.parametrize("points", [CLOSE, [(0, 9.0, 5.0), (0.5, 9.01, 5.02), (1, 9.02, 5.01)]])
def test_tradeoff_texts_do_not_overlap(points):
    fig = evaluation_plots.tradeoff_figure(rows(points), evaluation.SamplerSpec("ddim", 50))
    renderer = fig.canvas.get_renderer()
    texts = evaluation_plots._texts(fig)
    labels = [t.get_text() for t in texts]
    assert {f"w={w:g}" for w, _, _ in points} <= set(labels)
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    boxes.append(("legend", fig.legends[0].get_window_extent(renderer)))
    overlapping = [
        (a, b)
        for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2)
        if "w=" in a[:2] + b[:2] and box_a.overlaps(box_b)
    ]
    assert not overlapping
    matplotlib.pyplot.close(fig)
