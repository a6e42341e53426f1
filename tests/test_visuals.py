"""sample.py --morph / --interpolate / --inpaint on the tiny run: files, and bad input."""

import os

import numpy as np
import pytest
from PIL import Image

from diffusion_jax.commands import sample as sample_script


def run(workdir, out, *extra):
    return sample_script.main(["--workdir", workdir, "--out", str(out), "--steps", "3", *extra])


def test_morph_interpolate_and_inpaint_write_their_pictures(straight_run, tmp_path):
    workdir, _ = straight_run
    assert run(workdir, tmp_path, "--morph", "0,1,2", "--frames", "2") == 0
    gif = [f for f in os.listdir(tmp_path) if f.endswith("_morph.gif")]
    assert len(gif) == 1 and "morph0-1-2_f2_dpmpp2m3" in gif[0]
    # 2 frames per transition + the last class: 4 x 120 ms + the last held 1.5 s (Pillow merges
    # identical neighbouring frames, adding up their durations, so the total is what is checked)
    gif_image = Image.open(tmp_path / gif[0])
    total_ms = 0
    for i in range(gif_image.n_frames):
        gif_image.seek(i)
        total_ms += gif_image.info["duration"]
    assert total_ms == 4 * 120 + 1500
    assert run(workdir, tmp_path, "--interpolate", "4", "--frames", "3") == 0
    assert run(workdir, tmp_path, "--inpaint", "top", "--per_class", "3", "--resample", "2") == 0
    kinds = sorted(f.rsplit("_", 1)[1] for f in os.listdir(tmp_path))
    assert kinds == ["compare.png", "grid.png", "morph.gif", "strip.png"]


def bad_files(tmp_path):
    wrong_mask = tmp_path / "mask.npy"
    np.save(wrong_mask, np.ones((5, 5)))
    wrong_images = tmp_path / "big.npz"
    np.savez(wrong_images, samples=np.zeros((2, 28, 28, 1), np.uint8))
    out_of_range = tmp_path / "range.npz"
    np.savez(out_of_range, samples=np.full((2, 8, 8, 1), 3.0, np.float32))
    float_labels = tmp_path / "labels.npz"
    np.savez(float_labels, samples=np.zeros((2, 8, 8, 1), np.uint8), labels=[1.5, 2.0])
    return wrong_mask, wrong_images, out_of_range, float_labels


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--morph", "0,12"], "--morph takes two or more labels in [0, 10)"),
        (["--morph", "3"], "--morph takes two or more labels"),
        (["--morph", "0,1", "--sampler", "ddpm"], "deterministic sampler"),
        (["--interpolate", "10"], "--interpolate takes a label in [0, 10)"),
        (["--inpaint", "diagonal"], "--inpaint takes one of"),
        (["--inpaint", "{mask}"], "mask.npy': the mask has shape (5, 5)"),
        (["--inpaint", "top", "--images", "{big}"], "big.npz': samples have shape (2, 28, 28, 1)"),
        (
            ["--inpaint", "top", "--images", "{range}"],
            "range.npz': float samples must lie in [0, 1]",
        ),
        (["--inpaint", "top", "--images", "{labels}"], "labels.npz': labels must be a 1-D integer"),
        (["--inpaint", "top", "--resample", "0"], "resample must be an integer >= 1"),
    ],
)
def test_bad_input_names_the_flag_and_writes_nothing(
    straight_run, tmp_path, capsys, extra, message
):
    workdir, _ = straight_run
    mask, big, rng, labels = bad_files(tmp_path)
    extra = [e.format(mask=mask, big=big, range=rng, labels=labels) for e in extra]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run(workdir, out, *extra)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or os.listdir(out) == []


def test_a_morph_that_fails_mid_write_leaves_nothing(straight_run, tmp_path, monkeypatch):
    """The morph's GIF and grid are one output set: a failure (or signal) while the grid is
    written leaves neither, no staging folder, and the rerun needs no --overwrite."""
    from diffusion_jax import images

    workdir, _ = straight_run
    real_save_rows = images.save_rows

    def interrupted(*args, **kwargs):  # the GIF is written by now
        raise KeyboardInterrupt

    monkeypatch.setattr(images, "save_rows", interrupted)
    with pytest.raises(SystemExit) as stopped:
        run(workdir, tmp_path, "--morph", "0,1", "--frames", "2")
    assert stopped.value.code == 130
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(images, "save_rows", real_save_rows)
    assert run(workdir, tmp_path, "--morph", "0,1", "--frames", "2") == 0
    assert sorted(f.rsplit("_", 1)[1] for f in os.listdir(tmp_path)) == ["grid.png", "morph.gif"]
