"""Training math: the train state, pure step functions, and the jitted programs that run K lanes.

An epoch is one jitted program that shuffles on device and scans the steps,
with each batch split along the mesh's `data` axis. Randomness comes from a
lane's random stream (its state's `rng`, made from its seed, `stream`): the
epoch's shuffle key is `fold_in(shuffle_key, epoch)` and each step's dropout
key is `fold_in(dropout_key, step)`, drawn for the global batch, so the
trained model does not depend on the number of devices and a resumed run
repeats an uninterrupted one bit for bit.

`compile_program` builds the programs for K lanes: states, dropout rates and
totals carry a leading lane axis, the data is shared, and K > 1 vmaps the
single-lane epoch over that axis (lanes spread over the mesh's `trials` axis).
K = 1 runs the single-lane epoch itself, so a solo job pays nothing for the
lane axis. A lane's learning rate lives in its optimizer state and its dropout
rates are traced values: a new trial in a lane changes values, never shapes,
so it never recompiles.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh

from mnist_jax.common.errors import MnistJaxError
from mnist_jax.data.dataset import scale_pixels
from mnist_jax.model.mlp import MLP, init_params, make_optimizer
from mnist_jax.training import parallel
from mnist_jax.training.config import Config

# How many steps pass between progress-bar updates on a terminal.
PROGRESS_EVERY = 10
# Train steps per iteration of the epoch's loop: two amortise XLA:CPU's per-iteration cost and give
# bit-identical results.
SCAN_UNROLL = 2
COMPILE_CACHE_DIR = "~/.cache/mnist-jax/xla"
# One transformation updates every lane: `update` reads each lane's learning rate from its state.
OPTIMIZER = make_optimizer()


class TrainState(struct.PyTreeNode):
    """Everything that evolves during training; a checkpoint is exactly this."""

    step: jax.Array  # global step, counting every batch of every epoch
    epoch: jax.Array  # completed epochs
    params: Any
    opt_state: Any  # RMSprop's accumulator and the learning rate
    rng: jax.Array  # base key; shuffle and dropout keys are derived from it


class Hyperparams(NamedTuple):
    """The dropout rates: traced, so changing them never recompiles."""

    dropout_one: jax.Array
    dropout_two: jax.Array


class Totals(NamedTuple):
    """Sums over real (unpadded) examples; means are taken on the host."""

    loss_sum: jax.Array
    correct: jax.Array
    count: jax.Array

    @classmethod
    def zero(cls) -> Totals:
        return cls(*(jnp.float32(0),) * 3)


def hyperparams(config: Config) -> Hyperparams:
    return Hyperparams(jnp.float32(config.dropout_one), jnp.float32(config.dropout_two))


def stream(seed: int) -> jax.Array:
    """The random stream of `seed`: the base key of the shuffles and dropout masks of a state made from it."""
    return jax.random.split(jax.random.PRNGKey(seed))[1]


def create_train_state(model: MLP, key: jax.Array, learning_rate: jax.Array | float) -> TrainState:
    """A fresh state from `key`, which is `jax.random.PRNGKey(seed)`; its stream is `stream(seed)`."""
    init_key, rng = jax.random.split(key)
    params = init_params(model, init_key)
    return TrainState(
        step=jnp.int32(0),
        epoch=jnp.int32(0),
        params=params,
        opt_state=make_optimizer(learning_rate).init(params),
        rng=rng,
    )


def set_learning_rate(state: TrainState, learning_rate: jax.Array) -> TrainState:
    """`state` with RMSprop's rate set to `learning_rate` (it lives in the optimizer's state)."""
    opt = state.opt_state
    return state.replace(opt_state=opt._replace(hyperparams={**opt.hyperparams, "learning_rate": learning_rate}))


# --- pure step functions ---------------------------------------------------


def _loss(params: Any, model: MLP, batch: tuple, dropout_rates: tuple, rng: jax.Array | None):
    """Mean cross-entropy over the real examples of `batch` (weight 1), and the batch's totals."""
    x, y, weight = batch
    # Pixels are scaled inside the step, where XLA fuses it into the first matmul's input.
    logits = model.apply({"params": params}, scale_pixels(x), dropout_rates, rng)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
    totals = Totals(jnp.sum(weight * losses), jnp.sum(weight * correct), jnp.sum(weight))
    return totals.loss_sum / jnp.maximum(totals.count, 1.0), totals


def train_step(state: TrainState, batch: tuple, hp: Hyperparams, model: MLP) -> tuple[TrainState, Totals]:
    """One RMSprop step on a global batch (x uint8, y int32, weight float32)."""
    dropout_key = jax.random.fold_in(jax.random.split(state.rng)[1], state.step)
    grad_fn = jax.value_and_grad(_loss, has_aux=True)
    (_, totals), grads = grad_fn(state.params, model, batch, (hp.dropout_one, hp.dropout_two), dropout_key)
    updates, opt_state = OPTIMIZER.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), totals


def eval_step(params: Any, batch: tuple, model: MLP) -> Totals:
    return _loss(params, model, batch, (0.0, 0.0), None)[1]


def evaluate(params: Any, eval_data: tuple, *, model: MLP, batch_sharding: jax.sharding.Sharding) -> Totals:
    """Totals over an evaluation set laid out as (steps, batch, ...) by `placement.eval_steps`, a step at a
    time."""

    def body(totals, batch):
        batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        return jax.tree.map(jnp.add, totals, eval_step(params, batch, model)), None

    return jax.lax.scan(body, Totals.zero(), eval_data)[0]


def epoch_batches(rng: jax.Array, epoch: jax.Array, num_examples: int, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """This epoch's shuffled example indices as (steps, batch) and their weights.

    The last batch is padded with weight-0 copies of example 0, so every example
    is seen once per epoch and every step has the same static shape.
    """
    steps = -(-num_examples // batch_size)
    order = jax.random.permutation(jax.random.fold_in(jax.random.split(rng)[0], epoch), num_examples)
    padded = jnp.zeros(steps * batch_size, order.dtype).at[:num_examples].set(order)
    weight = (jnp.arange(steps * batch_size) < num_examples).astype(jnp.float32)
    return padded.reshape(steps, batch_size), weight.reshape(steps, batch_size)


def train_epoch(
    state: TrainState,
    train_data: tuple[jax.Array, jax.Array],
    hp: Hyperparams,
    *,
    model: MLP,
    batch_size: int,
    batch_sharding: jax.sharding.Sharding,
    progress: Callable[[jax.Array], None] | None = None,
) -> tuple[TrainState, Totals]:
    """One epoch of one lane: shuffle on device, then scan `train_step` over all batches."""
    x, y = train_data
    indices, weights = epoch_batches(state.rng, state.epoch, x.shape[0], batch_size)

    def body(carry, batch_plan):
        state, totals = carry
        index, weight = batch_plan
        batch = jax.lax.with_sharding_constraint((x[index], y[index], weight), batch_sharding)
        state, step_totals = train_step(state, batch, hp, model)
        if progress is not None:
            done = state.step - state.epoch * indices.shape[0]
            jax.lax.cond(done % PROGRESS_EVERY == 0, lambda d: jax.debug.callback(progress, d), lambda d: None, done)
        return (state, jax.tree.map(jnp.add, totals, step_totals)), None

    (state, totals), _ = jax.lax.scan(body, (state, Totals.zero()), (indices, weights), unroll=SCAN_UNROLL)
    return state.replace(epoch=state.epoch + 1), totals


def epoch_record(epoch: int, train: Totals, validation: Totals, seconds: float) -> dict[str, Any]:
    """An epoch's means from host copies of its totals; a non-finite loss is an error."""
    loss = float(train.loss_sum / train.count)
    if not np.isfinite(loss):
        raise MnistJaxError(f"loss became non-finite in epoch {epoch}; try a lower --learning-rate")
    return {
        "epoch": epoch,
        "loss": loss,
        "accuracy": float(train.correct / train.count),
        "val_loss": float(validation.loss_sum / validation.count),
        "val_accuracy": float(validation.correct / validation.count),
        "epoch_time_s": round(seconds, 4),
    }


# --- the programs of K lanes ---------------------------------------------------


class Program(NamedTuple):
    """The jitted functions of K lanes over one mesh; stacked trees have a leading lane axis."""

    epoch: Callable  # (states, train_data, hps) -> (states, totals); states donated, updated in place
    evaluate: Callable  # (stacked params, eval_data) -> stacked totals
    evaluate_lane: Callable  # (one lane's params, eval_data) -> totals
    fresh: Callable  # (key, learning_rate) -> a new lane's state
    blank: Callable  # () -> K lanes' states, all zeros (idle lanes)
    put: Callable  # (stacked, k, tree) -> stacked with lane k replaced; stacked donated
    take: Callable  # (stacked, k) -> lane k's tree
    copy: Callable  # (stacked) -> a copy that outlives the donation of the original to the next epoch
    perturb: Callable  # (states, donors, restream, streams, changed, learning_rates) -> states; states donated


def compile_program(model: MLP, batch_size: int, mesh: Mesh, lanes: int, progress: Callable | None = None) -> Program:
    """The jitted programs of `lanes` lanes on `mesh` (lane index `k` is an argument: any lane, one program).

    Programs without a progress callback are built once per process: a second run with the same model, batch,
    mesh and lanes (trials one after another, a notebook) reuses their traces and executables. A callback
    belongs to one run, so programs that call one are built for it alone.
    """
    if progress is None:
        return _kept_program(model, batch_size, mesh, lanes)
    return _build_program(model, batch_size, mesh, lanes, progress)


def _build_program(model: MLP, batch_size: int, mesh: Mesh, lanes: int, progress: Callable | None) -> Program:
    batch = parallel.batch_sharded(mesh)
    replicated, stacked = parallel.replicated(mesh), parallel.lanes_sharded(mesh)
    epoch = functools.partial(train_epoch, model=model, batch_size=batch_size, batch_sharding=batch, progress=progress)
    test = functools.partial(evaluate, model=model, batch_sharding=batch)
    if lanes == 1:  # the single-lane program itself: a batched matmul of batch 1 is slower than a matmul
        squeeze = functools.partial(jax.tree.map, lambda a: a[0])
        expand = functools.partial(jax.tree.map, lambda a: a[None])
        lane_epoch = lambda states, data, hps: expand(epoch(squeeze(states), data, squeeze(hps)))  # noqa: E731
        lane_test = lambda params, data: expand(test(squeeze(params), data))  # noqa: E731
    else:  # spmd_axis_name: the lane axis of every intermediate is split over the mesh's trials axis
        lane_epoch = jax.vmap(epoch, in_axes=(0, None, 0), spmd_axis_name=parallel.TRIALS_AXIS)
        lane_test = jax.vmap(test, in_axes=(0, None), spmd_axis_name=parallel.TRIALS_AXIS)
    abstract = jax.eval_shape(functools.partial(create_train_state, model), jax.random.PRNGKey(0), 0.0)
    return Program(
        epoch=jax.jit(lane_epoch, donate_argnums=0, out_shardings=(stacked, stacked)),
        evaluate=jax.jit(lane_test, out_shardings=stacked),
        evaluate_lane=jax.jit(test, out_shardings=replicated),
        # It runs once per trial, so XLA need not optimise it: the same values in less compile time.
        fresh=jax.jit(
            functools.partial(create_train_state, model),
            out_shardings=replicated,
            compiler_options={"xla_backend_optimization_level": 0},
        ),
        blank=jax.jit(
            lambda: jax.tree.map(lambda a: jnp.zeros((lanes, *a.shape), a.dtype), abstract), out_shardings=stacked
        ),
        put=jax.jit(
            lambda tree, k, lane: jax.tree.map(
                lambda a, b: jax.lax.dynamic_update_index_in_dim(a, b, k, 0), tree, lane
            ),
            donate_argnums=0,
            out_shardings=stacked,
        ),
        take=jax.jit(
            lambda tree, k: jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, k, 0, keepdims=False), tree),
            out_shardings=replicated,
        ),
        copy=jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=stacked),
        perturb=jax.jit(perturb_lanes, donate_argnums=0, out_shardings=stacked),
    )


def perturb_lanes(
    states: TrainState,
    donors: jax.Array,
    restream: jax.Array,
    streams: jax.Array,
    changed: jax.Array,
    learning_rates: jax.Array,
) -> TrainState:
    """Lane k takes lane `donors[k]`'s state (a gather over the lane axis: params, optimizer state, step) but keeps
    its own random stream, unless `restream[k]` gives it `streams[k]`; where `changed[k]`, its learning rate
    becomes `learning_rates[k]`. Values change, never shapes: one program serves every perturbation."""
    moved = jax.tree.map(lambda leaf: jnp.take(leaf, donors, axis=0), states)
    rng = jnp.where(restream[:, None], streams, states.rng)
    rates = jnp.where(changed, learning_rates, moved.opt_state.hyperparams["learning_rate"])
    return set_learning_rate(moved.replace(rng=rng), rates)


_kept_program = functools.cache(functools.partial(_build_program, progress=None))


def enable_compile_cache() -> None:
    """Keeps compiled programs on disk (JAX's persistent cache), so a rerun, a resumed job or
    the next tuning trial skips compilation; $JAX_COMPILATION_CACHE_DIR overrides the place and
    $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS what is worth keeping.

    Not for a job of several processes on CPUs: there a program loaded from the cache hangs in its first
    collective (seen with jax 0.12.1: two processes on 127.0.0.1 waited in the first epoch until killed, and the
    same job with the cache off trained in 10 s), so those jobs compile their programs."""
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        jax.config.update("jax_enable_compilation_cache", False)
        return
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(COMPILE_CACHE_DIR))
    if not os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
