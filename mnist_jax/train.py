"""Training: the train state, pure step functions, the epoch loop, and `main()`.

`python -m mnist_jax.train [flags]` trains the Keras mnist_mlp data-parallel on
every device: one jitted program per epoch that shuffles on device and scans
the steps, with the batch split along the mesh's `data` axis and params
replicated. Randomness comes from the seed alone: the epoch's shuffle key is
`fold_in(shuffle_key, epoch)` and each step's dropout key is
`fold_in(dropout_key, step)`, drawn for the global batch, so the trained model
does not depend on the number of devices and a resumed run repeats an
uninterrupted one bit for bit.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh

from mnist_jax import checkpoint, data, export, metrics, parallel, storage
from mnist_jax.config import DEFAULT_TRAIN_FILE, Config, parse_args
from mnist_jax.errors import MnistJaxError, report
from mnist_jax.model import MLP, count_params, init_params, make_optimizer

# How many steps pass between progress-bar updates on a terminal.
PROGRESS_EVERY = 10
# Train steps per iteration of the epoch's loop. Two amortise XLA:CPU's per-iteration
# cost (about 10% of an epoch here) and give bit-identical results; more gained nothing.
SCAN_UNROLL = 2
COMPILE_CACHE_DIR = "~/.cache/mnist-jax/xla"
# Test examples per evaluation step. All 10,000 at once held about 60 MB of activations,
# enough to lift the job's peak memory above Keras's; in steps of 1,000 it is 6 MB.
EVAL_BATCH = 1000


class TrainState(struct.PyTreeNode):
    """Everything that evolves during training; a checkpoint is exactly this."""

    step: jax.Array  # global step, counting every batch of every epoch
    epoch: jax.Array  # completed epochs
    params: Any
    opt_state: Any
    rng: jax.Array  # base key; shuffle and dropout keys are derived from it


class Hyperparams(NamedTuple):
    """Values that change the math but not the shapes: traced, so changing them never recompiles."""

    learning_rate: jax.Array
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
    return Hyperparams(*(jnp.float32(v) for v in (config.learning_rate, config.dropout_one, config.dropout_two)))


def create_train_state(model: MLP, key: jax.Array, learning_rate: float) -> TrainState:
    """A fresh state from `key`, which is `jax.random.PRNGKey(seed)`."""
    init_key, rng = jax.random.split(key)
    params = init_params(model, init_key)
    return TrainState(
        step=jnp.int32(0),
        epoch=jnp.int32(0),
        params=params,
        opt_state=make_optimizer(learning_rate).init(params),
        rng=rng,
    )


# --- pure step functions ---------------------------------------------------


def _loss(params: Any, model: MLP, batch: tuple, dropout_rates: tuple, rng: jax.Array | None):
    """Mean cross-entropy over the real examples of `batch` (weight 1), and the batch's totals."""
    x, y, weight = batch
    # Same normalisation as the Keras script (float32 pixels / 255), fused into the step.
    logits = model.apply({"params": params}, x.astype(jnp.float32) / 255.0, dropout_rates, rng)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
    totals = Totals(jnp.sum(weight * losses), jnp.sum(weight * correct), jnp.sum(weight))
    return totals.loss_sum / jnp.maximum(totals.count, 1.0), totals


def train_step(state: TrainState, batch: tuple, hp: Hyperparams, model: MLP) -> tuple[TrainState, Totals]:
    """One RMSprop step on a global batch (x uint8, y int32, weight float32)."""
    dropout_key = jax.random.fold_in(jax.random.split(state.rng)[1], state.step)
    grad_fn = jax.value_and_grad(_loss, has_aux=True)
    (_, totals), grads = grad_fn(state.params, model, batch, (hp.dropout_one, hp.dropout_two), dropout_key)
    updates, opt_state = make_optimizer(hp.learning_rate).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), totals


def eval_step(params: Any, batch: tuple, model: MLP) -> Totals:
    return _loss(params, model, batch, (0.0, 0.0), None)[1]


def evaluate(params: Any, test_data: tuple, *, model: MLP, batch_sharding: jax.sharding.Sharding) -> Totals:
    """Totals over the test set, laid out as (steps, batch, ...) by `place_data`, one step at a time."""

    def body(totals, batch):
        batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        return jax.tree.map(jnp.add, totals, eval_step(params, batch, model)), None

    return jax.lax.scan(body, Totals.zero(), test_data)[0]


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
    """One epoch: shuffle on device, then scan `train_step` over all batches."""
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


# --- data placement ----------------------------------------------------------


def place_data(dataset: data.Dataset, mesh: Mesh) -> tuple[tuple, tuple]:
    """Puts the training set on every device and the test set, in evaluation steps, sharded over them.

    The test set becomes (steps, batch, ...) with batches of about EVAL_BATCH
    examples, a multiple of the device count; the last is padded (weight 0), so
    evaluation covers all of it.
    """
    train = jax.device_put((dataset.x_train, dataset.y_train), parallel.replicated(mesh))
    n, devices = len(dataset.x_test), mesh.devices.size
    batch = -(-min(EVAL_BATCH, n) // devices) * devices
    steps = -(-n // batch)
    pad = steps * batch - n
    x_test = np.concatenate([dataset.x_test, np.zeros((pad, dataset.x_test.shape[1]), np.uint8)])
    y_test = np.concatenate([dataset.y_test, np.zeros(pad, np.int32)])
    weight = (np.arange(n + pad) < n).astype(np.float32)
    test = tuple(a.reshape(steps, batch, *a.shape[1:]) for a in (x_test, y_test, weight))
    return train, jax.device_put(test, parallel.steps_sharded(mesh))


def resolve_train_file(config: Config) -> str:
    """The dataset path; the embedded default is downloaded on first use."""
    if config.train_file is not None:
        return config.train_file
    if not os.path.exists(DEFAULT_TRAIN_FILE):
        data.download(DEFAULT_TRAIN_FILE)
    return DEFAULT_TRAIN_FILE


def load_data(train_file: str, batch_size: int, mesh: Mesh, say: Callable[..., None]) -> tuple[tuple, tuple, int]:
    """Reads and places the dataset; returns train data, test data and steps per epoch."""
    dataset = data.load(train_file)
    say(f"{len(dataset.x_train)} train samples\n{len(dataset.x_test)} test samples")
    train_data, test_data = place_data(dataset, mesh)
    # The devices hold their copy; keeping the host's would only raise peak memory.
    return train_data, test_data, -(-len(dataset.x_train) // batch_size)


# --- the loop --------------------------------------------------------------


def checkpoint_due(config: Config, epoch: int) -> bool:
    """Whether `epoch` ends with a checkpoint: every `checkpoint_every` epochs, and the last."""
    return epoch % config.checkpoint_every == 0 or epoch == config.epochs


def shaping(config: Config) -> dict[str, Any]:
    """The settings that fix a checkpoint's shapes, as this config has them."""
    return {key: getattr(config, key) for key in checkpoint.SHAPING_KEYS}


def checkpoint_meta(config: Config, epoch: int) -> dict[str, Any]:
    """What a checkpoint records beside the state: the settings that shaped it, all settings, the epoch."""
    return {
        "shaping": shaping(config),
        "config": config.to_dict(),
        "epoch": epoch,
    }


def epoch_record(epoch: int, train: Totals, test: Totals, seconds: float) -> dict[str, Any]:
    """The epoch's means from host copies of its totals; a non-finite loss ends the job."""
    loss = float(train.loss_sum / train.count)
    if not np.isfinite(loss):
        raise MnistJaxError(f"loss became non-finite in epoch {epoch}; try a lower --learning-rate")
    return {
        "epoch": epoch,
        "loss": loss,
        "accuracy": float(train.correct / train.count),
        "val_loss": float(test.loss_sum / test.count),
        "val_accuracy": float(test.correct / test.count),
        "epoch_time_s": round(seconds, 4),
    }


class Preempted(MnistJaxError):
    """SIGTERM arrived; the state was saved and the job should be rerun to continue."""


def write_config(config: Config, train_file: str) -> None:
    """Writes every resolved setting to `<job-dir>/config.json` (first write: fails fast on a bad job dir)."""
    record = {
        **config.to_dict(),
        "train_file": train_file,
        "runtime": {
            "devices": jax.device_count(),
            "processes": jax.process_count(),
            "platform": jax.devices()[0].platform,
            "jax": jax.__version__,
        },
    }
    storage.write_bytes_atomic(storage.join(config.job_dir, "config.json"), json.dumps(record, indent=2).encode())


def restore_or_create(config: Config, model: MLP, mesh: Mesh, ckpt: checkpoint.Checkpointer) -> tuple[TrainState, bool]:
    """The latest checkpoint's state on this mesh, or a fresh one; and whether it was restored."""
    replicated = parallel.replicated(mesh)
    fresh = functools.partial(create_train_state, model, learning_rate=config.learning_rate)
    key = jax.random.PRNGKey(config.seed)
    latest = ckpt.latest_step()
    if latest is None:
        # It runs once, so XLA need not optimise it: the same values in half the compile time
        # (0.35 s, not 0.8). The key is an argument, so all seeds share one cached program.
        create = jax.jit(fresh, out_shardings=replicated, compiler_options={"xla_backend_optimization_level": 0})
        return create(key), False
    state, _ = ckpt.restore(latest, jax.eval_shape(fresh, key), replicated, shaping(config))
    return state, True


def compile_steps(
    model: MLP, batch_size: int, mesh: Mesh, progress: Callable | None = None, *, trials: bool = False
) -> tuple[Callable, Callable]:
    """The jitted epoch (state donated: updated in place) and evaluation functions.

    With `trials`, both are vmapped over a leading trial axis of the state,
    hyperparameters and params (the data is shared): many trials in one program.
    """
    sharding = parallel.batch_sharded(mesh)
    epoch = functools.partial(
        train_epoch, model=model, batch_size=batch_size, batch_sharding=sharding, progress=progress
    )
    test = functools.partial(evaluate, model=model, batch_sharding=sharding)
    if trials:
        epoch, test = jax.vmap(epoch, in_axes=(0, None, 0)), jax.vmap(test, in_axes=(0, None))
    replicated = parallel.replicated(mesh)
    return (
        jax.jit(epoch, donate_argnums=0, out_shardings=replicated),
        jax.jit(test, out_shardings=replicated),
    )


def train_and_evaluate(config: Config) -> TrainState:
    """Trains per `config`, checkpointing to and reporting in its job dir; returns the final state."""
    is_main = jax.process_index() == 0
    say = print if is_main else (lambda *a, **k: None)
    if config.job_id or config.trial_id:
        say(f"Vertex AI job {config.job_id or '-'}, trial {config.trial_id or '-'}")
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    train_file = resolve_train_file(config)
    if is_main:
        write_config(config, train_file)
    train_data, test_data, steps_per_epoch = load_data(train_file, config.batch_size, mesh, say)

    model = MLP(hidden_units=config.hidden_units)
    ckpt = checkpoint.Checkpointer(checkpoint.manager_path(config.checkpoint_dir), keep=config.keep_checkpoints)
    state, resumed = restore_or_create(config, model, mesh, ckpt)
    say(metrics.model_summary(state.params, (config.dropout_one, config.dropout_two)))
    say(
        f"Training on {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{jax.process_count()} process(es); {count_params(state.params):,} parameters"
    )
    if resumed:
        say(f"Resuming from epoch {int(state.epoch)} (step {int(state.step)})")

    reporter = metrics.Reporter(config) if is_main else None
    bar = metrics.ProgressBar(steps_per_epoch) if is_main and sys.stdout.isatty() else None
    run_epoch, run_eval = compile_steps(
        model, config.batch_size, mesh, None if bar is None else lambda d: bar.update(int(d))
    )
    hp = jax.device_put(hyperparams(config), parallel.replicated(mesh))

    test_totals = None
    try:
        if reporter is not None:
            reporter.resume(int(state.epoch))
        with checkpoint.PreemptionGuard() as preemption:
            for epoch in range(int(state.epoch) + 1, config.epochs + 1):
                started = time.perf_counter()
                state, train_totals = run_epoch(state, train_data, hp)
                test_totals = run_eval(state.params, test_data)
                # The one host sync of the epoch; Keras's epoch time likewise includes evaluation.
                train_host, test_host = jax.device_get((train_totals, test_totals))
                record = epoch_record(epoch, train_host, test_host, time.perf_counter() - started)
                if bar is not None:
                    bar.clear()
                say(metrics.epoch_line(record, config.epochs), flush=True)
                if reporter is not None:
                    reporter.write(record)
                if checkpoint_due(config, epoch) or preemption.requested:
                    ckpt.save(state, checkpoint_meta(config, epoch))
                if preemption.requested:
                    raise Preempted(
                        f"SIGTERM: saved epoch {epoch} (step {int(state.step)}) to {ckpt.directory}; "
                        "rerun the same command to continue"
                    )
    finally:
        ckpt.close()  # every started save is committed before we return or raise
        if reporter is not None:
            reporter.close()

    if test_totals is None:  # nothing was left to train: report the restored model
        test_totals = run_eval(state.params, test_data)
    if is_main:
        finish(config, jax.device_get(state.params), jax.device_get(test_totals), say)
    return state


def finish(config: Config, params: Any, test: Totals, say: Callable[..., None]) -> None:
    """The seed's closing lines, and `model.h5` where the job's model goes."""
    say(f"Test loss: {float(test.loss_sum / test.count):.4f}")
    say(f"Test accuracy: {float(test.correct / test.count):.4f}")
    model_path = storage.join(config.model_dir, "model.h5")
    export.write_model(model_path, params, (config.dropout_one, config.dropout_two), config.learning_rate)
    say(f"Saved {model_path}")


def enable_compile_cache() -> None:
    """Keeps compiled programs on disk (JAX's persistent cache), so a rerun, a resumed job or
    the next tuning trial skips compilation; $JAX_COMPILATION_CACHE_DIR overrides the place."""
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(COMPILE_CACHE_DIR))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = parse_args(argv)
        parallel.initialize(config)
        enable_compile_cache()
        train_and_evaluate(config)
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        return 143  # 128 + SIGTERM, as if the signal had ended the process
    except MnistJaxError as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
