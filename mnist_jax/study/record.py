"""The study's record: trial statuses, `study.json`'s content, the progress line, the leaderboard, `study.png` and
a population's `pbt.png`.

Everything here is a pure function of the trials (Optuna `FrozenTrial`s, as a
snapshot of the storage gives them) and the study's spec: no storage, no files.
"""

from __future__ import annotations

import datetime
import importlib
import io
import math
import threading
from collections.abc import Sequence
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from mnist_jax.common.status import Status
from mnist_jax.study.heartbeat import OWNER
from mnist_jax.study.spec import Study

LEGEND_TRIALS = 12  # study.png names more trials than this at their curves' ends instead of in a legend


def status_of(state: TrialState) -> Status:
    """An Optuna trial state in Vertex AI's words."""
    return {
        TrialState.COMPLETE: Status.SUCCEEDED,
        TrialState.PRUNED: Status.STOPPED,
        TrialState.FAIL: Status.FAILED,
        TrialState.RUNNING: Status.ACTIVE,
        TrialState.WAITING: Status.REQUESTED,
    }[state]


def measure(spec: Study, values: Sequence[float]) -> float:
    """A trial's metric from its measurements, per the study's measurementSelectionType."""
    if spec.measurement_selection == "BEST_MEASUREMENT":
        return max(values) if spec.goal == "MAXIMIZE" else min(values)
    return values[-1]


def trial_record(spec: Study, t: FrozenTrial) -> dict[str, Any]:
    """One trial as study.json shows it."""
    measurements = [[step, value] for step, value in sorted(t.intermediate_values.items())]
    status = status_of(t.state)
    metric = None
    if status in (Status.SUCCEEDED, Status.STOPPED) and measurements:
        metric = measure(spec, [v for _, v in measurements])
    record = {
        "id": t.number + 1,
        "status": status.value,
        "params": t.user_attrs["params"],
        "metric": metric,
        "measurements": measurements,
        "job_dir": t.user_attrs.get("job_dir"),
        "worker": "{host}:{pid}".format(**t.system_attrs[OWNER]) if OWNER in t.system_attrs else None,
    }
    if "error" in t.user_attrs:
        record["error"] = t.user_attrs["error"]
    return record


def summary(spec: Study, trials: Sequence[FrozenTrial], header: dict[str, Any]) -> dict[str, Any]:
    """study.json's content: `header` (name, storage, search...), the study's status, its trials and the best."""
    records = [trial_record(spec, t) for t in trials if "params" in t.user_attrs]  # else a slot not yet taken
    scored = [t for t in records if t["metric"] is not None]
    pick = max if spec.goal == "MAXIMIZE" else min
    best = pick(scored, key=lambda t: t["metric"]) if scored else None
    failed = sum(t["status"] == Status.FAILED for t in records)
    unfinished = any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
    if failed >= spec.max_failed_trials or (not unfinished and not scored):
        status = Status.FAILED  # as on Vertex: maxFailedTrials reached, or nothing succeeded
    else:
        status = Status.ACTIVE if unfinished else Status.SUCCEEDED
    return {
        **header,
        "measurement_selection": spec.measurement_selection,
        "goal": spec.goal,
        "metric": spec.metric,
        "max_trials": spec.max_trials,
        "status": status.value,
        "trials": records,
        "best": best,
    }


def epochs_left(summary: dict[str, Any], epochs: int) -> int:
    """Trial-epochs the study has yet to train, if every trial trains `epochs`."""
    active = sum(epochs - len(t["measurements"]) for t in summary["trials"] if t["status"] == Status.ACTIVE)
    return max(active + (summary["max_trials"] - len(summary["trials"])) * epochs, 0)


def progress_line(summary: dict[str, Any], eta_s: float | None) -> str:
    """`study: 5/12 done (3 succeeded, 2 stopped, 0 failed), 2 running; best trial 4 accuracy=0.97; ETA 0:00:31`"""
    count = {s: sum(t["status"] == s for t in summary["trials"]) for s in Status}
    done = count[Status.SUCCEEDED] + count[Status.STOPPED] + count[Status.FAILED]
    best = summary["best"]
    return (
        f"study: {done}/{summary['max_trials']} done ({count[Status.SUCCEEDED]} succeeded, "
        f"{count[Status.STOPPED]} stopped, {count[Status.FAILED]} failed), {count[Status.ACTIVE]} running; "
        + (f"best trial {best['id']} {summary['metric']}={best['metric']:.4f}" if best else "no best yet")
        + (f"; ETA {datetime.timedelta(seconds=round(eta_s))}" if eta_s is not None else "")
    )


def leaderboard(summary: dict[str, Any]) -> str:
    """The trials as a table, best first."""
    names = sorted({name for t in summary["trials"] for name in t["params"]})
    sign = -1 if summary["goal"] == "MAXIMIZE" else 1
    ranked = sorted(summary["trials"], key=lambda t: (t["metric"] is None, sign * (t["metric"] or 0)))
    header = f"{'rank':>4}  {'trial':>5}  {'status':<9}  {summary['metric']:>12}  " + "  ".join(
        f"{n:>14}" for n in names
    )
    rows = [header, "-" * len(header)]
    for rank, t in enumerate(ranked, 1):
        metric = f"{t['metric']:.4f}" if t["metric"] is not None else "-"
        values = "  ".join(f"{_short(t['params'].get(n)):>14}" for n in names)
        rows.append(f"{rank:>4}  {t['id']:>5}  {t['status']:<9}  {metric:>12}  {values}")
    return "\n".join(rows)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)


def preload() -> None:
    """Imports matplotlib on a thread of its own, so the pictures drawn when a study ends do not wait for its
    import (1-2 s here) on the study's critical path."""

    def load() -> None:
        for module in ("matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.ticker"):
            importlib.import_module(module)

    threading.Thread(target=load, name="preload-matplotlib", daemon=True).start()


def study_png(summary: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    study_figure(summary).savefig(buffer, format="png")
    return buffer.getvalue()


def study_figure(summary: dict[str, Any]) -> Any:
    """Each trial's metric over epochs (stopped trials dashed, each named) and the best so far, trial by trial."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    curves, best = figure.subplots(1, 2)
    measured = [t for t in summary["trials"] if t["measurements"]]
    for t in measured:
        epochs, values = zip(*t["measurements"])
        style = "--" if t["status"] == Status.STOPPED else "-"
        (line,) = curves.plot(epochs, values, style, marker=".", alpha=0.7, label=f"trial {t['id']}")
        if len(measured) > LEGEND_TRIALS:  # too many for a legend: each curve's id at its end
            curves.annotate(str(t["id"]), (epochs[-1], values[-1]), fontsize=6, color=line.get_color())
    if measured and len(measured) <= LEGEND_TRIALS:
        curves.legend(fontsize=7, ncol=2)
    all_epochs = [e for t in measured for e, _ in t["measurements"]] or [1]
    curves.set_xlim(min(all_epochs) - 0.5, max(all_epochs) + 0.5)  # whole epochs on the axis, even for one
    curves.set(xlabel="epoch", ylabel=summary["metric"], title="each trial (dashed: stopped)")
    pick = max if summary["goal"] == "MAXIMIZE" else min
    scored = [t for t in summary["trials"] if t["metric"] is not None]
    running: list[float] = []
    for t in scored:
        running.append(pick(running[-1], t["metric"]) if running else t["metric"])
    best.step([t["id"] for t in scored], running, where="post")
    best.plot([t["id"] for t in scored], [t["metric"] for t in scored], "o", alpha=0.5)
    best.set(xlabel="trial", ylabel=summary["metric"], title="best so far")
    for axes in (curves, best):
        axes.grid(True, alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs and trials
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.12, top=0.92, wspace=0.25)
    return figure


def pbt_png(summary: dict[str, Any], exploits: Sequence[dict[str, Any]], spans: Sequence[dict[str, Any]]) -> bytes:
    buffer = io.BytesIO()
    pbt_figure(summary, exploits, spans).savefig(buffer, format="png")
    return buffer.getvalue()


def pbt_figure(summary: dict[str, Any], exploits: Sequence[dict[str, Any]], spans: Sequence[dict[str, Any]]) -> Any:
    """A population's picture: every member's metric by epoch, each exploit a jump from its donor's value to the
    member's next one, and below, the best member's settings epoch by epoch (`spans`, its schedule)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(10, 7), dpi=100)
    FigureCanvasAgg(figure)
    curves, rate, dropout = figure.subplots(3, 1, sharex=True, height_ratios=(3, 1, 1))
    measured = {t["id"]: dict(t["measurements"]) for t in summary["trials"] if t["measurements"]}
    for values in measured.values():
        curves.plot(list(values), list(values.values()), "-", marker=".", alpha=0.6, linewidth=1)
    # The member's next epoch starts from the donor's state: one arrow each, all in one artist (an annotation
    # each took 0.28 s of 0.51 s for a population of 64 with 144 exploits).
    jumps = [
        (e["epoch"], e["donor_metric"], after)
        for e in exploits
        if (after := measured.get(e["member"], {}).get(e["epoch"] + 1)) is not None
    ]
    if jumps:
        x, start, end = zip(*jumps)
        rise = [b - a for a, b in zip(start, end)]
        curves.quiver(x, start, [1] * len(x), rise, angles="xy", scale_units="xy", scale=1, color="0.4", alpha=0.6,
                      width=0.0015, headwidth=5, headlength=6)  # fmt: skip
    best = summary["best"]
    curves.set(ylabel=summary["metric"], title="each member (arrows: a member takes a donor's state)"
               + (f"; best: trial {best['id']}" if best else ""))  # fmt: skip
    epochs = [e for span in spans for e in range(span["first_epoch"], span["last_epoch"] + 1)]
    in_force = {e: span for span in spans for e in range(span["first_epoch"], span["last_epoch"] + 1)}
    rate.step(epochs, [in_force[e]["learning_rate"] for e in epochs], where="mid")
    rate.set(ylabel="learning rate")
    rate.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    for name in ("dropout_one", "dropout_two"):
        dropout.step(epochs, [in_force[e][name] for e in epochs], where="mid", label=name)
    dropout.set(xlabel="epoch", ylabel="dropout")
    dropout.legend(fontsize=7)
    for axes in (curves, rate, dropout):
        axes.grid(True, alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    figure.subplots_adjust(left=0.1, right=0.98, bottom=0.08, top=0.95, hspace=0.15)
    return figure
