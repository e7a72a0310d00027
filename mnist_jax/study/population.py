"""Population-based training: which members copy which, how the copies explore, and each member's recipe.

Every `perturb_every` epochs the members are ranked by the study's metric.
Each member of the bottom quantile copies the whole training state of a
member drawn from the top quantile (`Exploit`), then explores from the
donor's hyperparameters: each continuous parameter is multiplied by 0.8 or
1.2 in its scale (a log scale's value, a reverse-log scale's mirror), a
discrete or categorical one moves to a neighbouring value, and with
probability `RESAMPLE_PROBABILITY` a parameter is drawn afresh; every value
stays inside its bounds. The draws at epoch e come from a generator seeded
with (study seed, e), so a study resumed from a checkpoint draws what it would
have drawn uninterrupted.

A member keeps its own random stream (the seed of its shuffles and dropout
masks) when it copies a donor's state, so its final model has a recipe from
scratch (`schedule`): spans of epochs, each with the hyperparameters and the
stream in force, followed back through its donors. `python -m mnist_jax.train
--schedule` replays one alone.

Everything here is a pure function of the members, their metrics and the exploits so far.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mnist_jax.common.errors import ConfigError
from mnist_jax.study import search
from mnist_jax.study.spec import Parameter, Study
from mnist_jax.training import config as flags
from mnist_jax.training.config import PERTURBABLE

FACTORS = (0.8, 1.2)
RESAMPLE_PROBABILITY = 0.25
PERTURB_EVERY = 2
QUANTILE = 0.25


@dataclasses.dataclass(frozen=True)
class Exploit:
    """At the end of `epoch`, `member` took `donor`'s state and the settings `after` (it had `before`)."""

    epoch: int
    member: int  # trial ids, as study.json numbers them
    donor: int
    before: dict[str, float]  # the member's PERTURBABLE settings, by config name
    after: dict[str, float]
    member_metric: float
    donor_metric: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Exploit:
        return cls(**{field.name: record[field.name] for field in dataclasses.fields(cls)})


def check(spec: Study, rule: str) -> None:
    """A study PBT can run: it perturbs only settings of one program, every value it can reach is one its setting
    takes, and it stops no member early."""
    fixed = [p.name for p in spec.parameters if flags.field_name(p.name) not in PERTURBABLE]
    if fixed:
        names = ", ".join(flags.flag_name(name) for name in PERTURBABLE)
        raise ConfigError(f"--pbt perturbs {names} while members train; the study also tunes {', '.join(fixed)}")
    for p in spec.parameters:  # explore stays within the bounds: the bounds must be settings' values
        parse = flags.SETTINGS[flags.field_name(p.name)].parse
        for value in p.values or (p.min_value, p.max_value):
            try:
                parse(flags.flag_text(value))  # type: ignore[misc]
            except argparse.ArgumentTypeError as e:
                raise ConfigError(
                    f"--pbt: parameter {p.name} reaches {value!r}, which --{p.name} refuses: {e}"
                ) from None
    if rule != "none":
        raise ConfigError(f"--pbt replaces weak members instead of stopping them: --stopping {rule} makes no sense")


def member_seed(base: flags.Config, number: int) -> int:
    """Member `number` (0-based)'s seed: members differ in their initialisation and random stream too."""
    return base.seed + number


def settings(config: flags.Config) -> dict[str, float]:
    """A member's PERTURBABLE settings, by config name."""
    return {name: getattr(config, name) for name in PERTURBABLE}


def quantile_size(members: int, quantile: float) -> int:
    """How many members each quantile holds: at least one, at most half the population."""
    return min(max(1, math.ceil(members * quantile)), members // 2)


def _values(p: Parameter) -> list[float]:
    """A DISCRETE or CATEGORICAL parameter's values as its setting takes them (YAML may give strings)."""
    parse = flags.SETTINGS[flags.field_name(p.name)].parse
    return [parse(flags.flag_text(value)) for value in p.values]  # type: ignore[misc]


def _fresh(p: Parameter, rng: np.random.Generator) -> float:
    """A value of `p` drawn afresh in its scale, as Vertex's scale types map u in [0, 1]."""
    if p.type in ("CATEGORICAL", "DISCRETE"):
        values = _values(p)
        return values[int(rng.integers(len(values)))]
    low, high, u = float(p.min_value), float(p.max_value), rng.random()  # type: ignore[arg-type]
    if p.scale == "UNIT_LOG_SCALE":
        return low * (high / low) ** u
    if p.scale == "UNIT_REVERSE_LOG_SCALE":
        return low + high - low * (high / low) ** (1 - u)
    return low + u * (high - low)


def _nudged(p: Parameter, value: float, rng: np.random.Generator) -> float:
    """`value` moved by one step: x0.8 or x1.2 in a continuous parameter's scale, a neighbour otherwise."""
    if p.type in ("CATEGORICAL", "DISCRETE"):
        values = _values(p)
        index = min(range(len(values)), key=lambda i: abs(values[i] - value)) + (1 if rng.random() < 0.5 else -1)
        return values[min(max(index, 0), len(values) - 1)]
    low, high = float(p.min_value), float(p.max_value)  # type: ignore[arg-type]
    factor = FACTORS[int(rng.integers(2))]
    if p.scale == "UNIT_REVERSE_LOG_SCALE":  # denser near the top: the mirror a + b - x takes the factor
        moved = low + high - (low + high - value) * factor
    else:
        moved = value * factor
    return min(max(moved, low), high)


def explore(spec: Study, donor: Mapping[str, float], rng: np.random.Generator) -> dict[str, float]:
    """The donor's settings, each of the study's parameters nudged or drawn afresh."""
    after = dict(donor)
    for p in spec.parameters:
        name = flags.field_name(p.name)
        resample = rng.random() < RESAMPLE_PROBABILITY
        after[name] = _fresh(p, rng) if resample else _nudged(p, donor[name], rng)
    return after


def exploits(
    spec: Study,
    epoch: int,
    metrics: Mapping[int, float],
    current: Mapping[int, Mapping[str, float]],
    seed: int,
    quantile: float,
) -> list[Exploit]:
    """The exploits at the end of `epoch`: `metrics` and `current` settings by member (trial id)."""
    rng = np.random.default_rng([seed, epoch])
    sign = 1 if spec.goal == "MAXIMIZE" else -1
    ranked = sorted(metrics, key=lambda member: (sign * metrics[member], -member))  # worst first
    size = quantile_size(len(ranked), quantile)
    top = ranked[len(ranked) - size :]
    done = []
    for member in ranked[:size]:
        donor = top[int(rng.integers(len(top)))]
        after = explore(spec, current[donor], rng)
        done.append(Exploit(epoch, member, donor, dict(current[member]), after, metrics[member], metrics[donor]))
    return done


def settings_at(member: int, epoch: int, initial: Mapping[str, float], history: Sequence[Exploit]) -> dict[str, float]:
    """The member's settings in force for the epoch after `epoch`."""
    found = dict(initial)
    for exploit in history:
        if exploit.member == member and exploit.epoch <= epoch:
            found = dict(exploit.after)
    return found


def schedule(
    member: int,
    epochs: int,
    initial: Mapping[int, Mapping[str, float]],
    seeds: Mapping[int, int],
    history: Sequence[Exploit],
) -> list[dict[str, Any]]:
    """The recipe of `member`'s model after `epochs`, from scratch: spans of epochs, first to last, each with
    the settings in force, the member whose state trained then, and the seed of the random stream it used (the
    first span's seed also initialises the model)."""
    spans, current, end = [], member, epochs
    while True:
        earlier = [e for e in history if e.member == current and e.epoch < end]
        exploit = max(earlier, key=lambda e: e.epoch) if earlier else None
        start = exploit.epoch if exploit is not None else 0
        in_force = dict(exploit.after) if exploit is not None else dict(initial[current])
        spans.append(
            {"first_epoch": start + 1, "last_epoch": end, "member": current, "seed": seeds[current], **in_force}
        )
        if exploit is None:
            return spans[::-1]
        current, end = exploit.donor, exploit.epoch


def describe(spec: Study, settings: Mapping[str, Any] | None) -> str:
    """What searches, in words, for study.json and the console: PBT with its `settings`, or the study's search."""
    if settings is None:
        return search.describe(spec)
    every, quantile = settings["perturb_every"], settings["quantile"]
    return (
        f"population-based training (every {every} epochs the bottom {quantile:g} copy the top {quantile:g} "
        f"and explore; first settings by {search.describe(spec)})"
    )
