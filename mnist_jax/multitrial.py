"""Many trials in one program: tuning trials that share shapes, trained together by one vmapped epoch.

    python -m mnist_jax.multitrial GROUP.json

GROUP.json lists trials as `[{"argv": [trainer flags], "env": {variables}}, ...]`
(what `python -m mnist_jax.tune run --vectorize K` writes). Each trial's flags
and variables are parsed as `python -m mnist_jax.train` would parse them. The
trials may differ in what does not change shapes (dropout rates, learning rate,
seed) and must agree on the rest. Their states are stacked along a leading
axis, and one jitted program vmaps the trainer's own `train_epoch` over it, so
each trial computes the same math as when it runs alone, in one program that
is K times as wide: what an accelerator's idle width is for. (On the 2-core
CPU an epoch of K trials costs what K solo epochs cost; only the start-ups of
K - 1 processes are saved. README has the numbers.) Each
trial's outputs (job dir, checkpoints, metrics, TensorBoard, tuning metric,
model.h5) are written as if it had run alone; a rerun resumes all of them from
their checkpoints.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mnist_jax import checkpoint, metrics, parallel, train
from mnist_jax.config import Config, parse_args
from mnist_jax.errors import CheckpointError, ConfigError, MnistJaxError, report
from mnist_jax.model import MLP

# What may differ between trials trained together (the vmapped values, and where outputs go).
PER_TRIAL = {
    "learning_rate",
    "dropout_one",
    "dropout_two",
    "seed",
    "job_dir",
    "model_dir",
    "checkpoint_dir",
    "tensorboard_dir",
    "hpt_metric_file",
    "trial_id",
}


def check_compatible(configs: Sequence[Config]) -> None:
    first = configs[0].to_dict()
    for config in configs[1:]:
        different = sorted(k for k, v in config.to_dict().items() if k not in PER_TRIAL and v != first[k])
        if different:
            raise ConfigError(
                f"trials trained together must share {', '.join(different)} "
                f"(only {', '.join(sorted(PER_TRIAL))} may differ)"
            )


def stack(trees: Sequence[Any]) -> Any:
    """One tree of the trials' trees, each leaf stacked along a new leading trial axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def trial(stacked: Any, k: int) -> Any:
    """Trial `k`'s tree out of a stacked one."""
    return jax.tree.map(lambda leaf: leaf[k], stacked)


def train_trials(configs: Sequence[Config]) -> Any:
    """Trains the trials together; returns their stacked final states."""
    check_compatible(configs)
    base = configs[0]
    mesh = parallel.make_mesh()
    parallel.check_batch_size(base.batch_size, mesh)
    train_file = train.resolve_train_file(base)
    for config in configs:
        train.write_config(config, train_file)
    train_data, test_data, _ = train.load_data(train_file, base.batch_size, mesh, print)

    model = MLP(hidden_units=base.hidden_units)
    ckpts = [
        checkpoint.Checkpointer(checkpoint.manager_path(c.checkpoint_dir), keep=c.keep_checkpoints) for c in configs
    ]
    restored = [train.restore_or_create(c, model, mesh, ckpt) for c, ckpt in zip(configs, ckpts)]
    epochs = {int(state.epoch) for state, _ in restored}
    if len(epochs) != 1:
        raise CheckpointError(
            f"the trials' checkpoints are at different epochs {sorted(epochs)}; run them alone, or with new job dirs"
        )
    states = stack([state for state, _ in restored])
    start = epochs.pop()
    print(
        f"Training {len(configs)} trials in one program on {jax.device_count()} device(s)"
        + (f", resuming from epoch {start}" if start else "")
    )

    # (Sharing one batch plan between trials of one seed, so that vmap folds the first layer's
    # K matmuls into one wide matmul, measured 30% slower on the 2-core CPU: the folds need
    # transposes of the stacked weights every step.)
    run_epoch, evaluate = train.compile_steps(model, base.batch_size, mesh, trials=True)
    hps = jax.device_put(stack([train.hyperparams(c) for c in configs]), parallel.replicated(mesh))
    reporters = [metrics.Reporter(c) for c in configs]

    test_totals = None
    try:
        for reporter in reporters:
            reporter.resume(start)
        for epoch in range(start + 1, base.epochs + 1):
            started = time.perf_counter()
            states, train_totals = run_epoch(states, train_data, hps)
            test_totals = evaluate(states.params, test_data)
            train_host, test_host = jax.device_get((train_totals, test_totals))
            seconds = time.perf_counter() - started
            for k, (config, reporter, ckpt) in enumerate(zip(configs, reporters, ckpts)):
                record = train.epoch_record(epoch, trial(train_host, k), trial(test_host, k), seconds)
                print(f"[trial {config.trial_id or k}] {metrics.epoch_line(record, base.epochs)}", flush=True)
                reporter.write(record)
                if train.checkpoint_due(config, epoch):
                    ckpt.save(trial(states, k), train.checkpoint_meta(config, epoch))
    finally:
        for closable in [*ckpts, *reporters]:
            closable.close()

    if test_totals is None:  # nothing was left to train
        test_totals = evaluate(states.params, test_data)
    params, test_host = jax.device_get((states.params, test_totals))
    for k, config in enumerate(configs):
        print(f"[trial {config.trial_id or k}]")
        train.finish(config, trial(params, k), trial(test_host, k), print)
    return states


def load_group(path: str) -> list[Config]:
    """The trials of GROUP.json as configs, each parsed with its own flags and variables."""
    try:
        with open(path) as f:
            group = json.load(f)
        trials = [(list(t["argv"]), {str(k): str(v) for k, v in t.get("env", {}).items()}) for t in group]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"cannot read trial group {path}: {e}") from None
    if not trials:
        raise ConfigError(f"{path} lists no trials")
    return [parse_args(argv, {**os.environ, **env}) for argv, env in trials]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m mnist_jax.multitrial GROUP.json", file=sys.stderr)
        return 2
    try:
        train.enable_compile_cache()
        train_trials(load_group(args[0]))
    except MnistJaxError as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
