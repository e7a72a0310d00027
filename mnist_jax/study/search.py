"""The search: a study's algorithm, stopping rule and parameters as Optuna's sampler, pruner and suggestions.

Optuna does the searching; this module only maps Vertex AI's vocabulary onto it:
- ALGORITHM_UNSPECIFIED (Vertex's Bayesian default; legacy BAYESIAN_OPTIMIZATION):
  multivariate TPE, with the constant liar for trials that run at once;
- RANDOM_SEARCH: Optuna's random sampler;
- GRID_SEARCH: every combination of the parameters' values, each enqueued once
  when the study is created (so workers sharing a study cannot run one twice);
- medianAutomatedStoppingSpec / enableTrialEarlyStopping: Optuna's median
  pruner over the per-epoch metric (a trial is stopped when its best value so
  far is worse than the median of completed trials at the same epoch). It
  compares with completed trials only, so it cannot stop a study whose trials
  all run at once;
- `tune run --stopping halving`, an extension Vertex does not have: Optuna's
  successive halving (asynchronous, ASHA), which compares a trial with every
  trial that reached the same epoch, running ones included.

Scale types: linear and log are Optuna's own uniform and log-uniform draws,
the same formulas as Vertex. Optuna has no reverse log, so a reverse-log
parameter x in [a, b] is drawn as its mirror v = a + b - x, log-uniform in
[a, b], under the name `<name>:mirrored`; x = a + b - v then follows Vertex's
`a + b - a (b/a)^(1-u)` exactly. The parameters' own values are kept in each
trial's user attribute `params`.
"""

from __future__ import annotations

import itertools
from typing import Any

import optuna

from mnist_jax.study.spec import Parameter, Study

MIRRORED = ":mirrored"
# A median over fewer completed trials than this is noise, not evidence.
MEDIAN_STARTUP_TRIALS = 3
# Successive halving keeps the best 1/HALVING_FACTOR of the trials at epochs 1, 3, 9, ...
HALVING_FACTOR = 3
STOPPING = ("config", "median", "halving", "none")


def describe(study: Study) -> str:
    """What searches, in words, for study.json and the console."""
    if study.algorithm == "GRID_SEARCH":
        return "grid search (every combination once, enqueued in Optuna)"
    if study.algorithm == "RANDOM_SEARCH":
        return "random search (Optuna RandomSampler)"
    return f"Bayesian optimization (Optuna multivariate TPE after {startup_trials(study)} random trials)"


def startup_trials(study: Study) -> int:
    """TPE's random start: Optuna's 10, but at most a third of a small study, which would else stay random."""
    return max(1, min(10, study.max_trials // 3))


def sampler(study: Study, seed: int | None) -> optuna.samplers.BaseSampler:
    if study.algorithm == "ALGORITHM_UNSPECIFIED":
        return optuna.samplers.TPESampler(
            n_startup_trials=startup_trials(study), multivariate=True, constant_liar=True, seed=seed
        )
    return optuna.samplers.RandomSampler(seed=seed)  # grid trials arrive enqueued, with every value fixed


def stopping(study: Study, choice: str) -> str:
    """The stopping rule that runs: `choice` ("config": what the study config says), in STOPPING's words."""
    if choice == "config":
        return "median" if study.median_stopping else "none"
    return choice


def describe_stopping(rule: str) -> str:
    return {
        "median": "median (Optuna MedianPruner, against completed trials; Vertex's medianAutomatedStoppingSpec)",
        "halving": f"successive halving (Optuna SuccessiveHalvingPruner, reduction factor {HALVING_FACTOR}, "
        "against every trial that reached the same epoch; an extension Vertex does not have)",
        "none": "none",
    }[rule]


def pruner(study: Study, choice: str = "config") -> optuna.pruners.BasePruner:
    rule = stopping(study, choice)
    if rule == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=0)
    if rule == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=HALVING_FACTOR)
    return optuna.pruners.NopPruner()


def suggest(trial: optuna.Trial, p: Parameter) -> Any:
    """The trial's value of `p`, drawn on its scale (or the value already drawn or enqueued)."""
    if p.type in ("CATEGORICAL", "DISCRETE"):
        return trial.suggest_categorical(p.name, list(p.values))
    low, high = p.min_value, p.max_value
    draw = trial.suggest_int if p.type == "INTEGER" else trial.suggest_float
    if p.type == "INTEGER":
        low, high = int(low), int(high)  # type: ignore[arg-type]
    if p.scale == "UNIT_REVERSE_LOG_SCALE":
        return low + high - draw(p.name + MIRRORED, low, high, log=True)  # type: ignore[operator]
    return draw(p.name, low, high, log=p.scale == "UNIT_LOG_SCALE")


def grid(study: Study) -> list[dict[str, Any]]:
    """Every combination of the grid's values, as the Optuna parameters `suggest` reads, in order."""
    axes = []
    for p in study.parameters:
        if p.type in ("CATEGORICAL", "DISCRETE"):
            axes.append([(p.name, v) for v in p.values])
            continue
        low, high = int(p.min_value), int(p.max_value)  # type: ignore[arg-type]
        if p.scale == "UNIT_REVERSE_LOG_SCALE":
            axes.append([(p.name + MIRRORED, low + high - v) for v in range(low, high + 1)])
        else:
            axes.append([(p.name, v) for v in range(low, high + 1)])
    return [dict(combination) for combination in itertools.product(*axes)]
