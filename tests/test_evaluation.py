"""The evaluation classifier, the sweep end to end on a tiny checkpoint, and bad input."""

import json
import os

import numpy as np
import pytest

import evaluate as evaluate_script
from diffusion_jax import checkpoints, classifier, data, evaluation


def separable(n, seed):
    """8x8 images of 4 classes: class c lights the c-th quadrant, plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n).astype(np.int32)
    x = np.full((n, 8, 8, 1), -1.0, np.float32) + 0.3 * rng.standard_normal((n, 8, 8, 1))
    for i, c in enumerate(y):
        r, col = divmod(int(c), 2)
        x[i, 4 * r : 4 * r + 4, 4 * col : 4 * col + 4] += 1.5
    return np.clip(x, -1, 1).astype(np.float32), y


def test_classifier_learns_a_separable_set(tmp_path):
    (tx, ty), (vx, vy) = separable(512, 0), separable(128, 1)
    ds = data.Dataset("quadrants", tx, ty, vx, vy, 4)
    # 8x8 images: the default shift is none (a 2-pixel shift would move a quadrant away)
    clf = classifier.train_classifier(ds, epochs=4, batch_size=32, feature_dim=8, log=lambda m: 0)
    assert clf.test_accuracy >= 0.95
    classifier.save(clf, str(tmp_path / "clf"), ds.name)
    again = classifier.load(str(tmp_path / "clf"), ds)
    assert again.test_accuracy == clf.test_accuracy
    probs, feats = classifier.predict(again, vx)
    assert feats.shape == (128, 8) and np.allclose(probs.sum(1), 1)
    other = ds._replace(train_y=(ty + 1) % 4)
    with pytest.raises(checkpoints.CheckpointError, match="was trained on 'quadrants'"):
        classifier.load(str(tmp_path / "clf"), other)
    # a cache made by an older training recipe is refused, not silently reused
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(classifier, "RECIPE", classifier.RECIPE - 1)
        classifier.save(clf, str(tmp_path / "old"), ds.name)
    old = f"recipe {classifier.RECIPE - 1}, not the current recipe {classifier.RECIPE}"
    with pytest.raises(checkpoints.CheckpointError, match=old):
        classifier.load(str(tmp_path / "old"), ds)


def test_default_training_length_and_shift(monkeypatch):
    """epochs=None: about MIN_STEPS steps and at least MIN_EPOCHS; max_shift=None: side // 14."""
    seen, logs = [], []
    real_shift = classifier.random_shift
    monkeypatch.setattr(
        classifier, "random_shift", lambda x, k, m: seen.append(m) or real_shift(x, k, m)
    )
    monkeypatch.setattr(classifier, "MIN_STEPS", 9)
    monkeypatch.setattr(classifier, "MIN_EPOCHS", 2)
    (tx, ty), (vx, vy) = separable(64, 0), separable(16, 1)
    small = data.Dataset("quadrants", tx, ty, vx, vy, 4)
    classifier.train_classifier(small, batch_size=32, feature_dim=8, log=logs.append)
    assert logs[-1].startswith("classifier epoch 5/5")  # 2 steps an epoch: ceil(9 / 2) = 5 > 2
    assert seen == []  # 8x8: no shift
    big = small._replace(
        train_x=np.resize(tx, (64, 28, 28, 1)), test_x=np.resize(vx, (16, 28, 28, 1))
    )
    classifier.train_classifier(big, batch_size=32, epochs=1, feature_dim=8, log=logs.append)
    assert seen == [2]  # 28x28: up to 2 pixels (traced once)


def translate(image, dy, dx):
    """numpy reference: image (H, W, C) moved down dy and right dx, uncovered pixels -1."""
    h, w, _ = image.shape
    out = np.full_like(image, -1.0)
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def test_random_shift_translates_each_image_within_range():
    import jax

    rng = np.random.default_rng(0)
    images = rng.uniform(-0.9, 1, (64, 7, 6, 2)).astype(np.float32)  # no pixel equals the fill
    shifted = np.asarray(classifier.random_shift(images, jax.random.PRNGKey(3), 2))
    offsets = set()
    for image, out in zip(images, shifted, strict=True):
        matches = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if np.array_equal(out, translate(image, dy, dx))
        ]
        assert len(matches) == 1, "every output must be one translation of its own input"
        offsets.add(matches[0])
    assert len(offsets) >= 15  # independent offsets per image, not one for the batch
    same = classifier.random_shift(images, jax.random.PRNGKey(3), 0)
    np.testing.assert_array_equal(np.asarray(same), images)


@pytest.fixture(scope="module")
def tiny_classifier_dir(tmp_path_factory, tiny_data):
    directory = str(tmp_path_factory.mktemp("clf"))
    clf = classifier.train_classifier(tiny_data, epochs=1, feature_dim=8, log=lambda m: 0)
    classifier.save(clf, directory, tiny_data.name)
    return directory


def test_sweep_end_to_end(straight_run, tiny_classifier_dir, tmp_path):
    workdir, _ = straight_run
    out = str(tmp_path / "eval")
    args = [
        "--workdir",
        workdir,
        "--w",
        "0,1",
        "--samplers",
        "ddim:2,ddpm,dpmpp2m:3",
        "--guidance_sampler",
        "ddim:2",
        "--per_class",
        "2",
        "--classifier_dir",
        tiny_classifier_dir,
        "--out",
        out,
        "--no_progress",
    ]
    assert evaluate_script.main(args) == 0
    assert sorted(os.listdir(out)) == [
        "accuracy_vs_w.png",
        "fd_vs_is.png",
        "fd_vs_nfe.png",
        "results.json",
        "results.md",
    ]
    result = json.load(open(os.path.join(out, "results.json")))
    runs = [(r["sampler"], r["nfe"], r["w"]) for r in result["rows"]]
    # deduplicated; "ddpm" alone is every training step
    assert runs == [("ddim", 2, 0.0), ("ddim", 2, 1.0), ("ddpm", 20, 1.0), ("dpmpp2m", 3, 1.0)]
    for r in result["rows"]:
        assert r["n"] == 20 and r["floor_n"] == 20 and sum(r["class_counts"]) == 20
        assert 0 <= r["accuracy"] <= 1 and 1 <= r["is"] <= 10
        assert r["fd"] >= 0 and r["floor_fd"] >= 0
    table = open(os.path.join(out, "results.md")).read()
    assert "| sampler | NFE | w | n | FD | FD floor |" in table and table.count("| ddim |") == 2
    assert "| dpmpp2m | 3 | 1 | 20 |" in table
    with pytest.raises(SystemExit):  # outputs exist: refused
        evaluate_script.main(args)


def test_npz_input(straight_run, tiny_classifier_dir, tmp_path, tiny_data, capsys):
    workdir, _ = straight_run
    config, _ = checkpoints.read_config(workdir)
    real = tiny_data.test_x[:40]
    good = tmp_path / "good.npz"
    np.savez(
        good, samples=np.round((real + 1) * 127.5).astype(np.uint8), labels=tiny_data.test_y[:40]
    )
    row = evaluation.evaluate_npz(
        str(good), config, classifier_dir=tiny_classifier_dir, log=lambda m: 0
    )
    # real test images asked for their true labels: accuracy is the classifier's own
    assert row["accuracy"] > 0.5 and row["n"] == 40
    cases = {
        "nolabels.npz": (dict(samples=np.zeros((4, 8, 8, 1), np.uint8)), "no 'labels'"),
        "shape.npz": (
            dict(samples=np.zeros((4, 28, 28, 1), np.uint8), labels=np.zeros(4)),
            "the data set's images are",
        ),
        "range.npz": (dict(samples=np.full((4, 8, 8, 1), -0.5), labels=np.zeros(4)), "[0, 1]"),
    }
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(SystemExit) as exit_info:
            evaluate_script.main(
                [
                    "--workdir",
                    workdir,
                    "--npz",
                    str(tmp_path / name),
                    "--classifier_dir",
                    tiny_classifier_dir,
                ]
            )
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: evaluation.parse_floats("0,a", "--w"), "--w takes comma-separated numbers"),
        (lambda: evaluation.parse_samplers("euler:5", 20), "unknown sampler 'euler'"),
        (lambda: evaluation.parse_samplers("ddim:50", 20), r"steps must be in \[1, 20\]"),
        (lambda: evaluation.parse_samplers("ddim:x", 20), "SAMPLER:STEPS"),
    ],
)
def test_unparseable_lists(call, match):
    with pytest.raises(ValueError, match=match):
        call()
