"""The model equals Keras's: parameter count, initializers, RMSprop update, dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry2x32_p

from mnist_jax.model.mlp import MLP, count_params, dropout, init_params, keep_mask, make_optimizer, threefry2x32


def test_parameter_count_and_names():
    params = init_params(MLP(), jax.random.PRNGKey(0))
    assert count_params(params) == 669_706
    assert {k: v["kernel"].shape for k, v in params.items()} == {
        "dense": (784, 512),
        "dense_1": (512, 512),
        "dense_2": (512, 10),
    }


def test_keras_initializers():
    params = init_params(MLP(), jax.random.PRNGKey(0))
    for layer in params.values():
        kernel = np.asarray(layer["kernel"])
        limit = np.sqrt(6 / sum(kernel.shape))  # glorot_uniform
        assert np.abs(kernel).max() <= limit
        assert np.std(kernel) == pytest.approx(limit / np.sqrt(3), rel=0.05)
        assert not np.any(np.asarray(layer["bias"]))  # zeros


def test_rmsprop_matches_keras_update():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 3)).astype(np.float32)
    grads = [rng.standard_normal((5, 3)).astype(np.float32) for _ in range(5)]
    lr, rho, eps = 0.001, 0.9, 1e-7

    # Keras: v = rho v + (1 - rho) g^2; w -= lr g / sqrt(v + eps), v starting at zero.
    w_keras, v = w.copy(), np.zeros_like(w)
    for g in grads:
        v = rho * v + (1 - rho) * g * g
        w_keras = w_keras - lr * g / np.sqrt(v + eps)

    tx = make_optimizer(lr)
    params, state = jnp.asarray(w), tx.init(jnp.asarray(w))
    for g in grads:
        updates, state = tx.update(jnp.asarray(g), state, params)
        params = params + updates
    np.testing.assert_allclose(params, w_keras, rtol=1e-6, atol=1e-7)


def test_keep_mask_rate_and_determinism():
    key = jax.random.PRNGKey(3)
    mask = np.asarray(keep_mask(key, (256, 512), 0.2))
    assert abs(mask.mean() - 0.8) < 0.005
    # Both halves of each threefry output are used, and each is unbiased.
    assert abs(mask[:, :256].mean() - 0.8) < 0.01 and abs(mask[:, 256:].mean() - 0.8) < 0.01
    np.testing.assert_array_equal(mask, keep_mask(key, (256, 512), 0.2))
    assert (mask != np.asarray(keep_mask(jax.random.PRNGKey(4), (256, 512), 0.2))).mean() > 0.2
    assert np.asarray(keep_mask(key, (8, 7), 0.0)).all()
    assert keep_mask(key, (8, 7), 0.5).shape == (8, 7)  # odd widths work


def test_threefry_matches_jax_and_fixes_the_mask_stream():
    key = jax.random.PRNGKey(11)
    x0 = jnp.asarray(np.random.default_rng(0).integers(0, 2**32, (64, 96), dtype=np.uint32))
    x1 = x0 ^ jnp.uint32(0x9E3779B9)
    expected = jax.jit(lambda k, a, b: threefry2x32_p.bind(k[0], k[1], a, b))(key, x0, x1)
    for got in (threefry2x32(key, x0, x1), jax.jit(threefry2x32)(key, x0, x1)):
        for g, e in zip(got, expected):
            np.testing.assert_array_equal(g, e)
    # The mask is word one of each hash for the first half of a row and word two for the
    # rest, compared with rate * 2^32: the stream checkpoints and results depend on.
    rows, cols, rate = 6, 9, 0.3
    first = jnp.arange(rows, dtype=jnp.uint32)[:, None] * cols + jnp.arange(5, dtype=jnp.uint32)
    low, high = threefry2x32_p.bind(key[0], key[1], first, first + 5)
    bits = np.concatenate([low, high], axis=1)[:, :cols]
    threshold = (np.float32(rate) * np.float32(2**32)).astype(np.uint32)
    np.testing.assert_array_equal(keep_mask(key, (rows, cols), rate), bits >= threshold)


def test_dropout_scales_kept_units():
    x = jnp.ones((64, 512))
    out = np.asarray(dropout(x, 0.25, jax.random.PRNGKey(0)))
    assert set(np.unique(out)) == {0.0, np.float32(1 / 0.75)}
    assert dropout(x, 0.25, None) is x
