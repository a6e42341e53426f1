"""U-Net and MLP denoiser: shapes, zero start, conditioning wired in, bfloat16, bad shapes, and
the registry of networks (each takes the kind of data it declares, and refuses the others)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import MLPDenoiser, UNet, datasets, denoiser, models
from diffusion_jax.config import get_config
from diffusion_jax.embeddings import Conditioning, sinusoidal_embedding
from diffusion_jax.unet import depth_to_space, space_to_depth

TINY = dict(
    num_classes=10,
    channels=8,
    channel_mults=(1, 2, 2),
    num_res_blocks=1,
    attention_resolutions=(7, 8),
    num_heads=2,
    num_groups=4,
    dropout=0.1,
)


def init(model, shape):
    x = jnp.zeros(shape)
    t = jnp.zeros(shape[:1], jnp.int32)
    return jax.jit(model.init)(jax.random.PRNGKey(0), x, t, t)["params"]


def randomize_head(params, key):
    """Give the zero-initialised output layer random weights so the output shows its inputs."""

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "head" in name or (
            "Dense_" in name and "kernel" in name and leaf.ndim == 2 and "Conditioning" not in name
        ):
            return jax.random.normal(jax.random.fold_in(key, leaf.size), leaf.shape) * 0.1
        return leaf

    return jax.tree_util.tree_map_with_path(fill, params)


@pytest.fixture(scope="module")
def unet28():
    model = UNet(**TINY)
    return model, init(model, (2, 28, 28, 1)), (2, 28, 28, 1)


@pytest.fixture(scope="module", params=["28x28", "32x32"])
def unet(request):
    if request.param == "28x28":
        return request.getfixturevalue("unet28")
    model = UNet(**TINY)
    return model, init(model, (2, 32, 32, 3)), (2, 32, 32, 3)


def test_unet_shapes_and_zero_init(unet):
    model, params, shape = unet
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    fn = jax.jit(denoiser(model))
    out = fn(params, x, jnp.array([3, 900]), jnp.array([1, 10]))
    assert out.shape == shape and out.dtype == jnp.float32
    assert float(jnp.abs(out).max()) == 0.0  # zero-initialised output layer
    head = randomize_head(params, jax.random.PRNGKey(2))
    base = fn(head, x, jnp.array([3, 900]), jnp.array([1, 10]))
    assert float(jnp.abs(base).max()) > 0
    # time and class conditioning both reach the output, per example
    other_t = fn(head, x, jnp.array([3, 100]), jnp.array([1, 10]))
    other_c = fn(head, x, jnp.array([3, 900]), jnp.array([1, 4]))
    np.testing.assert_allclose(other_t[0], base[0], atol=1e-6)
    assert float(jnp.abs(other_t[1] - base[1]).max()) > 1e-4
    np.testing.assert_allclose(other_c[0], base[0], atol=1e-6)
    assert float(jnp.abs(other_c[1] - base[1]).max()) > 1e-4


def test_dropout_only_in_training(unet28):
    model, params, shape = unet28
    head = randomize_head(params, jax.random.PRNGKey(2))
    x, t = jnp.ones(shape), jnp.zeros(shape[:1], jnp.int32)
    train_fn = jax.jit(denoiser(model, train=True))
    a = train_fn(head, x, t, t, rngs={"dropout": jax.random.PRNGKey(0)})
    b = train_fn(head, x, t, t, rngs={"dropout": jax.random.PRNGKey(1)})
    assert float(jnp.abs(a - b).max()) > 0
    eval_fn = jax.jit(denoiser(model))
    e1, e2 = eval_fn(head, x, t, t), eval_fn(head, x, t, t)
    np.testing.assert_array_equal(e1, e2)


def test_bfloat16_activations_float32_params(unet28):
    model32, params, shape = unet28
    model16 = model32.clone(dtype=jnp.bfloat16)
    x, t = jnp.zeros(shape), jnp.zeros(shape[:1], jnp.int32)
    shapes16 = jax.eval_shape(model16.init, jax.random.PRNGKey(0), x, t, t)["params"]
    assert jax.tree_util.tree_structure(shapes16) == jax.tree_util.tree_structure(params)
    params = randomize_head(params, jax.random.PRNGKey(3))
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    x = jax.random.normal(jax.random.PRNGKey(4), shape)
    t = jnp.array([5, 500])
    out16 = jax.jit(denoiser(model16))(params, x, t, t % 10)
    out32 = jax.jit(denoiser(model32))(params, x, t, t % 10)
    assert out16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out16)))
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert rel < 0.1, rel  # same function, bfloat16 rounding only


@pytest.mark.parametrize(
    "kw, shape, match",
    [
        ({}, (1, 30, 30, 1), "divisible by 4"),
        ({"channel_mults": (1, 2, 2, 2)}, (1, 28, 28, 1), "divisible by 8"),
        ({}, (1, 28, 28), "NHWC"),
        ({"num_groups": 3}, (1, 28, 28, 1), "num_groups=3"),
        ({"num_heads": 3}, (1, 28, 28, 1), "num_heads=3"),
        ({"patch_size": 2}, (1, 28, 28, 1), "divisible by 8"),
        ({"patch_size": 0}, (1, 28, 28, 1), "patch_size must be >= 1"),
    ],
)
def test_unet_rejects_bad_shapes(kw, shape, match):
    with pytest.raises(ValueError, match=match):
        UNet(**{**TINY, **kw}).check_input_shape(shape)


def test_mlp_denoiser():
    model = MLPDenoiser(num_classes=3, hidden=32, num_layers=2)
    params = init(model, (4, 2))
    out = denoiser(model)(params, jnp.ones((4, 2)), jnp.arange(4), jnp.array([0, 1, 2, 3]))
    assert out.shape == (4, 2) and float(jnp.abs(out).max()) == 0.0
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        model.check_input_shape((4, 2, 1))


def test_space_to_depth_layout_and_inverse():
    """Against an explicit numpy loop: channel (di * p + dj) * C + c of patch (i, j) holds pixel
    (i * p + di, j * p + dj, c); depth_to_space undoes it exactly."""
    p = 2
    x = np.random.default_rng(0).standard_normal((2, 6, 4, 3)).astype(np.float32)
    expected = np.zeros((2, 3, 2, p * p * 3), np.float32)
    for i in range(3):
        for j in range(2):
            for di in range(p):
                for dj in range(p):
                    expected[:, i, j, (di * p + dj) * 3 : (di * p + dj + 1) * 3] = x[
                        :, i * p + di, j * p + dj, :
                    ]
    packed = space_to_depth(jnp.asarray(x), p)
    np.testing.assert_array_equal(np.asarray(packed), expected)
    np.testing.assert_array_equal(np.asarray(depth_to_space(packed, p)), x)


def test_patched_unet_is_the_plain_unet_on_patches():
    """UNet(patch_size=2) on 28x28x1 equals a plain UNet with 4 output channels applied to the
    14x14x4 patches, its output unfolded: the same parameters, the same function."""
    kw = {**TINY, "channel_mults": (1, 2), "attention_resolutions": (7,)}
    patched, plain = UNet(**kw, patch_size=2), UNet(**kw, out_channels=4)
    params = randomize_head(init(patched, (2, 28, 28, 1)), jax.random.PRNGKey(3))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        init(plain, (2, 14, 14, 4))
    )
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 28, 28, 1))
    t, y = jnp.array([5, 700]), jnp.array([2, 10])
    out = jax.jit(denoiser(patched))(params, x, t, y)
    ref = depth_to_space(jax.jit(denoiser(plain))(params, space_to_depth(x, 2), t, y), 2)
    assert out.shape == (2, 28, 28, 1) and float(jnp.abs(out).max()) > 0
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_sinusoidal_embedding_closed_form():
    """sin(t w_i) then cos(t w_i), w_i = 10000^(-i / half) for i < half = dim // 2, a zero column
    appended for odd dim (float64 numpy)."""
    t = np.array([0, 1, 7, 999])
    for dim in (8, 9):
        half = dim // 2
        angles = t[:, None] * 10000.0 ** (-np.arange(half) / half)[None]
        expected = np.concatenate(
            [np.sin(angles), np.cos(angles), np.zeros((len(t), dim - 2 * half))], axis=1
        )
        got = sinusoidal_embedding(jnp.asarray(t), dim)
        assert got.shape == (len(t), dim) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), expected, atol=2e-4)


def test_conditioning_is_time_mlp_plus_class_row():
    """Conditioning = Dense(swish(Dense(sinusoid(t)))) + class_table[label], from its parameters
    in float64 numpy; the table has num_classes + 1 rows (the last: null) and is absent for an
    unconditional model."""
    dim, t, labels = 8, jnp.array([0, 5, 40]), jnp.array([0, 2, 3])
    model = Conditioning(dim, num_classes=3)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), t, labels)["params"]
    # a random (non-zero) class table, so that its sign and rows are seen
    table = np.random.default_rng(0).standard_normal((4, dim)).astype(np.float32)
    params = {**params, "class": {"embedding": jnp.asarray(table)}}
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

    def swish(x):
        return x / (1 + np.exp(-x))

    h = np.asarray(sinusoidal_embedding(t, dim), np.float64)
    h = h @ p["time_dense0"]["kernel"] + p["time_dense0"]["bias"]
    h = swish(h) @ p["time_dense1"]["kernel"] + p["time_dense1"]["bias"]
    out = model.apply({"params": params}, t, labels)
    np.testing.assert_allclose(np.asarray(out), h + table[np.asarray(labels)], atol=1e-5)
    for num_classes, rows in ((0, None), (1, 2)):
        shapes = jax.eval_shape(Conditioning(dim, num_classes).init, jax.random.PRNGKey(0), t, t)
        got = shapes["params"].get("class", {}).get("embedding")
        assert (got.shape if got is not None else None) == (None if rows is None else (rows, dim))


# a small batch of each kind of data, and a preset whose data are of that kind
EXAMPLES = {"image": ((2, 8, 8, 1), "tiny"), "points": ((3, 2), "toy2d")}


def test_every_kind_of_data_has_an_example():
    assert set(EXAMPLES) == set(datasets.KINDS)


@pytest.mark.parametrize("name", tuple(models.NETWORKS))
def test_every_registered_network_takes_the_kind_it_declares(name):
    entry = models.NETWORKS[name]
    kind = entry.module.input_kind
    assert kind in datasets.KINDS
    shape, preset = EXAMPLES[kind]
    config = get_config(preset, model=name)  # (validated: the preset's data are of this kind)
    model = models.build_model(config)
    assert type(model) is entry.module and model.num_classes == config.num_classes
    params = models.init_params(model, jax.random.PRNGKey(0), shape)
    t = jnp.arange(shape[0])
    assert denoiser(model)(params, jnp.ones(shape), t, t % config.num_classes).shape == shape
    for other, (wrong, _) in EXAMPLES.items():
        if other == kind:
            continue
        message = f"{entry.module.__name__} expects {datasets.KINDS[kind].shape}, got shape {wrong}"
        with pytest.raises(ValueError, match=re.escape(message)):
            models.init_params(model, jax.random.PRNGKey(0), wrong)
        with pytest.raises(ValueError, match=re.escape(message)):  # the module's own call too
            denoiser(model)(params, jnp.ones(wrong), t[:1] * 0, t[:1] * 0)
