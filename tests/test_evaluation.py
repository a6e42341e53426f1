"""The evaluation classifier, the sweep end to end on a tiny checkpoint, and bad input."""

import json
import logging
import os

import numpy as np
import pytest

from diffusion_jax import checkpoints, classifier, cli, data, evaluation, metrics
from diffusion_jax.commands import evaluate as evaluate_script


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
    clf = classifier.train_classifier(ds, epochs=4, batch_size=32, feature_dim=8)
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


def test_default_training_length_and_shift(monkeypatch, caplog):
    """epochs=None: about MIN_STEPS steps and at least MIN_EPOCHS; max_shift=None: side // 14."""
    caplog.set_level(logging.INFO, logger="diffusion_jax")
    seen = []
    real_shift = classifier.random_shift
    monkeypatch.setattr(
        classifier, "random_shift", lambda x, k, m: seen.append(m) or real_shift(x, k, m)
    )
    monkeypatch.setattr(classifier, "MIN_STEPS", 9)
    monkeypatch.setattr(classifier, "MIN_EPOCHS", 2)
    (tx, ty), (vx, vy) = separable(64, 0), separable(16, 1)
    small = data.Dataset("quadrants", tx, ty, vx, vy, 4)
    classifier.train_classifier(small, batch_size=32, feature_dim=8)
    # 2 steps an epoch: ceil(9 / 2) = 5 > 2
    assert caplog.messages[-1].startswith("classifier epoch 5/5")
    assert seen == []  # 8x8: no shift
    big = small._replace(
        train_x=np.resize(tx, (64, 28, 28, 1)), test_x=np.resize(vx, (16, 28, 28, 1))
    )
    classifier.train_classifier(big, batch_size=32, epochs=1, feature_dim=8)
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


def test_sweep_end_to_end(straight_run, tiny_classifier_dir, tmp_path, capsys):
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
    printed = capsys.readouterr().out
    # its cost up front (2 + 2 + 20 + 3 steps, one batch each), the time left after one run
    assert "this sweep makes 27 network calls (4 runs of 20 samples at batch 1000)" in printed
    assert "the other 3 runs will take about" in printed
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
    assert "| sampler | NFE | spacing | x0 | w | n | FD | FD floor |" in table
    assert table.count("| ddim |") == 2
    # each sampler with its own defaults: DPM-Solver++ on log-SNR spacing
    assert "| dpmpp2m | 3 | logsnr | clip | 1 | 20 |" in table
    assert "| ddim | 2 | uniform | clip | 0 | 20 |" in table
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
    row = evaluation.evaluate_npz(str(good), config, classifier_dir=tiny_classifier_dir)
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
        (lambda: cli.parse_list("0,a", float, name="--w"), "--w takes comma-separated numbers"),
        (lambda: evaluation.parse_samplers("euler:5", 20), "unknown sampler 'euler'"),
        (lambda: evaluation.parse_samplers("ddim:50", 20), r"steps must be in \[1, 20\]"),
        (lambda: evaluation.parse_samplers("ddim:x", 20), "SAMPLER:STEPS"),
    ],
)
def test_unparseable_lists(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_check_images_maps_uint8_and_unit_floats_to_the_model_range():
    u8 = np.reshape(np.array([0, 51, 255], np.uint8), (3, 1, 1, 1))
    out = evaluation.check_images(u8, (1, 1, 1))
    np.testing.assert_allclose(out.ravel(), [-1.0, 51 / 127.5 - 1, 1.0], atol=1e-6)
    unit = np.reshape(np.array([0.0, 0.25, 1.0]), (3, 1, 1, 1))
    out = evaluation.check_images(unit, (1, 1, 1))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.ravel(), [-1.0, -0.5, 1.0], atol=1e-7)


def test_floors_compare_distinct_real_images_and_samples_use_the_same_test_subset(monkeypatch):
    """With a stub classifier (features: the pixels): the floor of n samples compares n distinct
    training images with min(n, test size) distinct test images, and the samples' distance is to
    that same test subset (float64 metrics computed here from the subsets)."""
    rng = np.random.default_rng(0)
    train = rng.standard_normal((80, 2, 2, 1)).astype(np.float32)
    test = rng.standard_normal((50, 2, 2, 1)).astype(np.float32)
    ds = data.Dataset("stub", train, np.arange(80) % 4, test, np.arange(50) % 4, 4)

    def predict(clf, images):  # probabilities: one-hot of the sign of the first pixel
        x = np.asarray(images, np.float64).reshape(len(images), -1)
        return np.eye(4)[(x[:, 0] > 0).astype(int)], x

    monkeypatch.setattr(evaluation.classifier_lib, "predict", predict)
    ref = evaluation.Reference(None, ds)
    test_feats = test.reshape(50, -1).astype(np.float64)
    for n in (20, 80):
        floors = ref.floors(n)
        te = floors["test_index"]
        assert floors["floor_n"] == len(te) == min(n, 50) == len(set(te.tolist()))
    # n = 80 is the whole training set: distinct rows are all of it, in some order
    expected = metrics.frechet_distance_of_features(train.reshape(80, -1), test_feats)
    assert ref.floors(80)["floor_fd"] == pytest.approx(expected, rel=1e-9)
    samples = rng.standard_normal((20, 2, 2, 1)).astype(np.float32)
    row = evaluation.evaluate_images(ref, samples, np.zeros(20, int))
    te = ref.floors(20)["test_index"]
    expected = metrics.frechet_distance_of_features(samples.reshape(20, -1), test_feats[te])
    assert row["fd"] == pytest.approx(expected, rel=1e-9) and row["floor_n"] == 20


def test_the_classifier_recipe_is_pinned():
    """What classifier.RECIPE 2 is: the CNN's parameter shapes on 28x28 digits and the default
    training length and hyper-parameters. Any change to them changes every reported distance, so
    it must come with a RECIPE bump (which retires cached classifiers) and a new pin here."""
    import inspect

    import jax
    import jax.numpy as jnp

    assert classifier.RECIPE == 2
    assert (classifier.MIN_STEPS, classifier.MIN_EPOCHS) == (700, 6)
    defaults = {
        k: p.default for k, p in inspect.signature(classifier.train_classifier).parameters.items()
    }
    assert {k: defaults[k] for k in ("batch_size", "lr", "feature_dim", "max_shift")} == {
        "batch_size": 128,
        "lr": 1e-3,
        "feature_dim": 64,
        "max_shift": None,
    }
    x = jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32)
    shapes = jax.eval_shape(classifier.CNN().init, jax.random.PRNGKey(0), x)["params"]
    kernels = {name: layer["kernel"].shape for name, layer in shapes.items()}
    assert kernels == {
        "Conv_0": (3, 3, 1, 32),
        "Conv_1": (3, 3, 32, 32),
        "Conv_2": (3, 3, 32, 64),
        "Conv_3": (3, 3, 64, 64),
        "Dense_0": (7 * 7 * 64, 64),  # two 2x2 poolings: 28 -> 14 -> 7
        "Dense_1": (64, 10),
    }
    # both dropout rates are 0.25: in training, the activations kept are scaled by 1 / (1 - 0.25)
    model = classifier.CNN()
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
    small = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
    params = jax.tree.map(lambda s: 0.3 * rng.standard_normal(s.shape).astype(np.float32), small)

    def intermediates(train):
        _, state = model.apply(
            {"params": params},
            x,
            train=train,
            rngs={"dropout": jax.random.PRNGKey(2)},
            capture_intermediates=True,
            mutable=["intermediates"],
        )
        layers = state["intermediates"]
        return {
            k: np.asarray(layers[k]["__call__"][0]) for k in ("Dense_0", "Dropout_0", "Dropout_1")
        }

    evaluated, trained = intermediates(False), intermediates(True)
    for inputs, outputs in (
        (evaluated["Dropout_0"], trained["Dropout_0"]),  # identity when not training
        (np.maximum(trained["Dense_0"], 0), trained["Dropout_1"]),  # relu(Dense_0) goes in
    ):
        kept = outputs != 0
        assert 0 < kept.sum() < (inputs != 0).sum()
        np.testing.assert_allclose(outputs[kept] / inputs[kept], 1 / (1 - 0.25), rtol=1e-5)


def test_npz_mistakes_end_in_one_line(straight_run, tiny_classifier_dir, tmp_path, capsys):
    """Labels outside [0, 10), float labels, NaN images, no samples, an empty file or a bare
    .npy: exit 2 with one line saying what is wrong, never metrics of nonsense."""
    workdir, _ = straight_run
    u8 = np.zeros((4, 8, 8, 1), np.uint8)
    cases = {
        "above.npz": (dict(samples=u8, labels=np.array([0, 1, 2, 12])), "values [12]"),
        "negative.npz": (dict(samples=u8, labels=np.array([0, -1, 2, 3])), "values [-1]"),
        "null.npz": (dict(samples=u8, labels=np.array([0, 1, 10, 3])), "10 marks unconditional"),
        "float.npz": (
            dict(samples=u8, labels=np.array([0, 1.5, 2, 3])),
            "labels must be integer class indices in [0, 10), got float64",
        ),
        "nan.npz": (
            dict(samples=np.full((4, 8, 8, 1), np.nan), labels=np.arange(4)),
            "samples hold 256 NaN or infinite values",
        ),
        "inf.npz": (
            dict(samples=np.where(u8 == 0, np.inf, 0.5), labels=np.arange(4)),
            "NaN or infinite",
        ),
        "none.npz": (
            dict(samples=np.zeros((0, 8, 8, 1), np.uint8), labels=np.zeros(0, int)),
            "there are no samples",
        ),
    }
    for name, (arrays, _) in cases.items():
        np.savez(tmp_path / name, **arrays)
    (tmp_path / "empty.npz").write_bytes(b"")
    cases["empty.npz"] = (None, "is an empty file")
    np.save(tmp_path / "bare.npy", u8)
    cases["bare.npy"] = (None, "holds a single array, not an .npz archive")
    # numpy would advise allow_pickle=True for a text file (issue 25)
    (tmp_path / "notes.npz").write_text("step,loss\n1,0.5\n")
    cases["notes.npz"] = (None, "is not an .npz archive (it starts like text: 'step,loss')")
    np.savez(tmp_path / "one.npz", samples=u8[:1], labels=np.array([3]))  # FD would be NaN
    cases["one.npz"] = (None, "1 sample is too few: a Frechet distance needs at least 2")
    for name, (_, message) in cases.items():
        argv = ["--workdir", workdir, "--npz", str(tmp_path / name)]
        with pytest.raises(SystemExit) as exit_info:
            evaluate_script.main(argv + ["--classifier_dir", tiny_classifier_dir])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, name
        assert message in err and err.count("\n") == 1, (name, err)
        assert "allow_pickle" not in err


def test_json_is_strict_a_nan_becomes_null(caplog):
    text = evaluation.to_json({"rows": [{"fd": float("nan"), "is": 2.0}], "x": np.float64(1)})
    parsed = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert parsed == {"rows": [{"fd": None, "is": 2.0}], "x": 1.0}
    assert "rows[0].fd is nan; written as null" in caplog.text


def test_a_concurrent_classifier_cache_write_is_used_not_an_error(tiny_classifier_dir, tiny_data):
    """Two evaluate.py runs train a classifier for the same new cache: the second rename finds
    the first's complete cache (Errno 39 before issue 25's fix), keeps it and reads it."""
    clf = classifier.load(tiny_classifier_dir, tiny_data)
    target = tiny_classifier_dir + "-shared"
    classifier.save(clf, target, tiny_data.name)
    assert classifier.save(clf, target, tiny_data.name) is False  # the race lost: no error
    parent = os.path.dirname(target)
    assert not [e for e in os.listdir(parent) if ".partial-" in e]  # our copy is removed
    loaded = classifier.get_classifier(tiny_data, target)
    assert loaded.test_accuracy == clf.test_accuracy


def test_help_shows_each_default(capsys):
    with pytest.raises(SystemExit):
        evaluate_script.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for default in ("0,0.5,1,2,4", "ddim:50", "100", "1000", "0", "WORKDIR/eval"):
        assert f"(default: {default})" in out, default
    assert "(default: ddpm,ddim:100," in out


def test_network_calls_of_the_default_sweep():
    from diffusion_jax.plans import SamplingPlan

    runs = [SamplingPlan("ddim", 50, w=w) for w in (0, 0.5, 1, 2, 4)]
    specs = evaluation.parse_samplers("ddpm,ddim:50,dpmpp2m:10", 1000)
    runs += [SamplingPlan(s.solver, s.steps, w=1.0) for s in specs]
    runs = list(dict.fromkeys(runs))  # (ddim:50, w=1) once, as in the sweep
    assert evaluation.network_calls(runs, 1000, 1000) == 250 + 1000 + 10
    assert evaluation.network_calls(runs, 1001, 1000) == 2 * 1260


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
        (["--batch_size", "-3"], "--batch_size must be >= 1, got -3"),
        (["--seed", "4294967296"], "--seed must be <= 4294967295"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--w", "0,nan"], "--w must be a finite number >= 0, got nan"),
        (["--w=-1"], "--w must be a finite number >= 0, got -1.0"),
        (["--steps_w", "inf"], "--steps_w must be a finite number >= 0, got inf"),
        (["--classifier_epochs", "0"], "--classifier_epochs must be >= 1"),
        (["--per_class", "0"], "--per_class must be >= 1"),
    ],
)
def test_bad_numeric_flags_are_refused_first(
    straight_run, tiny_classifier_dir, tmp_path, capsys, extra, message
):
    """Refused before any checkpoint, data set or classifier is read, and nothing written."""
    workdir, _ = straight_run
    out = tmp_path / "eval"
    argv = ["--workdir", workdir, "--out", str(out), "--classifier_dir", tiny_classifier_dir]
    argv += ["--samplers", "ddim:2", "--guidance_sampler", "ddim:2", "--per_class", "1"]
    with pytest.raises(SystemExit) as exit_info:
        evaluate_script.main(argv + ["--no_progress"] + extra)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1
    assert not out.exists()
