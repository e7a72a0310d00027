"""The Keras mnist_mlp as a Flax module, and its RMSprop optimizer.

Dense 512 relu, Dropout, Dense 512 relu, Dropout, Dense 10, with Keras's
initializers (glorot_uniform kernels, zero biases): 669,706 parameters. The
module returns logits; softmax lives in the loss (and in the exported Keras
model). Layer names match Keras's (`dense`, `dense_1`, `dense_2`) so export is
a plain renaming-free copy.

Dropout rates are call-time values, not module fields, and the learning rate
lives in the optimizer's state: both are traced, so changing them does not
recompile, and they can be vmapped over.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mnist_jax.data.dataset import IMAGE_PIXELS, NUM_CLASSES

# Keras RMSprop defaults (optax's own eps default is 1e-8; Keras uses 1e-7 inside the sqrt).
RMSPROP_RHO = 0.9
RMSPROP_EPSILON = 1e-7
# Threefry-2x32's rotation constants, alternating between groups of four rounds.
THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(key: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 (20 rounds) of the counter pairs (x0, x1) under a uint32[2] key.

    The same hash, bit for bit, as `jax.random`'s threefry2x32 primitive (a test
    checks), written out in plain array ops. On CPU jax lowers that primitive
    as a five-iteration while loop whose every intermediate goes through
    memory; unrolled, XLA fuses the whole hash and the comparison that uses it
    into one elementwise loop, four times faster.
    """
    ks = (key[0], key[1], key[0] ^ key[1] ^ jnp.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in THREEFRY_ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = x0 ^ ((x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r)))
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return x0, x1


def keep_mask(rng: jax.Array, shape: tuple[int, int], rate: jax.Array | float) -> jax.Array:
    """A (batch, features) boolean mask, True with probability 1 - rate.

    Each element gets 32 random bits from threefry-2x32 keyed by `rng` and
    counted by its position in the global batch, so the mask is the same
    however the batch is split over devices. One threefry call yields two
    words, and both are used (columns j and j + features/2 of a row), which
    halves the hashing that `jax.random.bernoulli` does for the same mask.
    Both halves stay in the same row, so the work splits along the batch with
    no communication.
    """
    rows, cols = shape
    half = (cols + 1) // 2
    first = jnp.arange(rows, dtype=jnp.uint32)[:, None] * cols + jnp.arange(half, dtype=jnp.uint32)
    low, high = threefry2x32(rng, first, first + half)
    # P(bits >= rate * 2^32) = 1 - rate, to within 2^-24 (rate is float32).
    threshold = (jnp.asarray(rate, jnp.float32) * 4294967296.0).astype(jnp.uint32)
    # Both decisions packed into one array, so XLA computes each hash once in a
    # single-output fusion (two outputs would each recompute the whole hash).
    packed = (low >= threshold).astype(jnp.uint8) | ((high >= threshold).astype(jnp.uint8) << 1)
    return jnp.concatenate([packed & 1, packed >> 1], axis=1)[:, :cols].astype(bool)


def dropout(x: jax.Array, rate: jax.Array | float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout as Keras does it: zero with probability `rate`, scale the rest by 1/(1-rate)."""
    if rng is None:
        return x
    return jnp.where(keep_mask(rng, x.shape, rate), x / (1.0 - rate), 0.0)


class MLP(nn.Module):
    """The mnist_mlp network: two hidden ReLU layers with dropout, 10 logits out."""

    hidden_units: int = 512
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        dropout_rates: tuple[Any, Any] = (0.0, 0.0),
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """`x` is (batch, IMAGE_PIXELS) float in [0, 1]; pass `rng` to apply dropout (training)."""
        dense = functools.partial(nn.Dense, kernel_init=nn.initializers.glorot_uniform())
        keys = (None, None) if rng is None else tuple(jax.random.split(rng))
        x = nn.relu(dense(self.hidden_units, name="dense")(x))
        x = dropout(x, dropout_rates[0], keys[0])
        x = nn.relu(dense(self.hidden_units, name="dense_1")(x))
        x = dropout(x, dropout_rates[1], keys[1])
        return dense(self.num_classes, name="dense_2")(x)


def init_params(model: MLP, rng: jax.Array) -> Any:
    return model.init(rng, jnp.zeros((1, IMAGE_PIXELS), jnp.float32))["params"]


def count_params(params: Any) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(params))


# The learning rate is a value in the optimizer's state (so it is checkpointed, traced and vmappable);
# the Keras constants stay constants of the program.
_rmsprop = optax.inject_hyperparams(
    optax.rmsprop, static_args=("decay", "eps", "initial_scale"), hyperparam_dtype=jnp.float32
)


def make_optimizer(learning_rate: jax.Array | float = 0.001) -> optax.GradientTransformation:
    """Keras RMSprop: v = rho v + (1 - rho) g^2; w -= lr g / sqrt(v + eps). `learning_rate` sets the
    initial state's rate; `update` reads the rate from the state, so one transformation updates every trial."""
    return _rmsprop(learning_rate=learning_rate, decay=RMSPROP_RHO, eps=RMSPROP_EPSILON)
