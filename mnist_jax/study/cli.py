"""The study's command line: `tune convert` and `tune run`, the way Vertex AI runs a study.

`convert` prints the Vertex AI form of a legacy study config. `run` runs a
study: Optuna searches (`search`: Bayesian by default, random or grid, with
median stopping when the study asks, or successive halving with `--stopping
halving`), and trials train either as real `python -m mnist_jax.train`
processes, P at once (`processes`), each given its parameters as
`--name=value` flags and its own job dir `DIR/trial-<id>`, or, with
`--vectorize K`, in K lanes of one training program that refill as trials end
(`lanes`); with `--pbt`, the trials are one population in lanes, whose weak
members copy strong ones (`pbt`). Each trial writes what it would write alone.

The study lives in Optuna storage (`store`), by default `DIR/study.db`
(SQLite); `--storage URL` names any Optuna RDB URL, so a PostgreSQL or MySQL
server lets several machines share one study. Rerunning the same command
resumes: finished trials are kept, interrupted ones resume from their
checkpoints. `DIR/study.json` (`record`) is rewritten atomically while trials
end (`driver`), and at the end with `study.png`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml

from mnist_jax.common import cli, log, storage
from mnist_jax.common.errors import ConfigError, MnistJaxError
from mnist_jax.common.log import logger
from mnist_jax.common.status import Status
from mnist_jax.study import lanes, pbt, population, processes, record, search
from mnist_jax.study.driver import Driver
from mnist_jax.study.heartbeat import STALE_AFTER_S
from mnist_jax.study.rdb import PATIENCE_S, StorageDown
from mnist_jax.study.spec import load_study, to_vertex
from mnist_jax.study.store import StudyStore
from mnist_jax.training import config as flags
from mnist_jax.training.config import LANE_GROUPS_DIR


def build_parser() -> cli.Parser:
    parser = cli.Parser(
        prog="python -m mnist_jax.tune",
        description="Hyperparameter tuning on this machine, the way Vertex AI runs a study.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="print the Vertex AI form of a legacy study config")
    convert.add_argument("config", help="a legacy (or Vertex) study config, YAML")
    run = commands.add_parser(
        "run", help="run a study on this machine", description="Run a study; trainer flags go after --."
    )
    run.add_argument("--config", required=True, help="legacy or Vertex study config, YAML (default: required)")
    run.add_argument(
        "--job-dir", required=True, help="the trials' job dirs and study.json; local or gs:// (default: required)"
    )
    run.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="Optuna storage URL; a PostgreSQL or MySQL URL shares the study between machines "
        "(default: sqlite:///<job-dir>/study.db; required for a gs:// job dir)",
    )
    run.add_argument("--study-name", default=None, help="the study's name in the storage (default: the job dir's name)")
    run.add_argument(
        "--max-trials", type=int, default=None, help="override the study's trial count (default: the config's)"
    )
    run.add_argument(
        "--parallel-trials", type=int, default=None, help="trial processes at once (default: the config's)"
    )
    run.add_argument("--seed", type=int, default=0, help="search seed: the same seed draws the same study")
    run.add_argument(
        "--vectorize",
        type=int,
        default=1,
        metavar="K",
        help="train K trials at once in lanes of one program, refilled as trials end "
        "(trials may differ in anything but the data and shapes); 1: each trial its own process",
    )
    run.add_argument(
        "--stopping",
        choices=search.STOPPING,
        default="config",
        help="the early-stopping rule: the study config's (median when it asks, else none), median, "
        "halving (successive halving against every trial at the same epoch, running ones included: "
        "an extension Vertex does not have), or none",
    )
    run.add_argument(
        "--stale-after",
        type=float,
        default=STALE_AFTER_S,
        metavar="SECONDS",
        help="take over another host's trial once its worker has been silent this long (a preempted VM's "
        "worker is gone for good); each worker's heartbeat is written four times in that span",
    )
    run.add_argument(
        "--storage-patience",
        type=float,
        default=PATIENCE_S,
        metavar="SECONDS",
        help="how long to wait for a storage server that stopped answering (a restart, a failover) before "
        "stopping with one line",
    )
    run.add_argument(
        "--pbt",
        action="store_true",
        help="population-based training: the study's trials are one population, all in lanes at once "
        "(vectorize at least maxTrials); every E epochs the bottom quantile Q of the members copy the state of "
        "members of the top one and explore their settings",
    )
    run.add_argument(
        "--perturb-every",
        type=cli.int_at_least(1),
        default=None,
        metavar="E",
        help=f"with --pbt: epochs between perturbations (default: {population.PERTURB_EVERY})",
    )
    run.add_argument(
        "--pbt-quantile",
        type=cli.float_in(0, 0.5, low_open=True, high_open=False),
        default=None,
        metavar="Q",
        help=f"with --pbt: the fraction of members copied, and copied from (default: {population.QUANTILE:g})",
    )
    flags.add_flags(run, flags.OUTPUT_FLAGS)
    return parser


def default_storage(job_dir: str) -> str:
    if not storage.is_local(job_dir):
        raise ConfigError(
            f"a {job_dir.split(':', 1)[0]}:// job dir needs --storage (an Optuna RDB URL such as "
            "postgresql://..., or sqlite:///study.db on this machine)"
        )
    return f"sqlite:///{os.path.abspath(os.path.join(job_dir, 'study.db'))}"


def open_driver(args: Any, extra: Sequence[str]) -> Driver:
    """The study the flags name, opened (or joined) in its storage, and this worker's driver for it."""
    spec, _ = load_study(args.config)
    overrides = {
        k: v for k, v in (("max_trials", args.max_trials), ("parallel_trials", args.parallel_trials)) if v is not None
    }
    if any(v < 1 for v in (*overrides.values(), args.vectorize)):
        raise ConfigError("--max-trials, --parallel-trials and --vectorize must be >= 1")
    if args.stale_after <= 0 or args.storage_patience <= 0:
        raise ConfigError("--stale-after and --storage-patience must be > 0 seconds")
    spec = dataclasses.replace(spec, **overrides)
    flags.check_tunable([p.name for p in spec.parameters], args.config)
    base = flags.parse_args([*extra, "--job-dir", args.job_dir.rstrip("/")])  # bad trainer flags fail here
    if spec.metric != base.hpt_metric_tag:
        raise ConfigError(
            f"{args.config}: the study's metric is '{spec.metric}', but the trainer reports its validation accuracy "
            f"as '{base.hpt_metric_tag}'; use that metric id, or pass --hpt-metric-tag {spec.metric} after --"
        )
    name = args.study_name or Path(args.job_dir.rstrip("/")).name or "study"
    storage.make_dirs(args.job_dir, "--job-dir")
    url = args.storage or default_storage(args.job_dir)
    given = [name for name in ("perturb_every", "pbt_quantile") if getattr(args, name) is not None]
    if given and not args.pbt:
        named = " and ".join("--" + flags.flag_name(name) for name in given)
        raise ConfigError(f"{named} {'go' if len(given) > 1 else 'goes'} with --pbt")
    pbt = None
    if args.pbt:
        every, quantile = args.perturb_every or population.PERTURB_EVERY, args.pbt_quantile or population.QUANTILE
        pbt = {"perturb_every": every, "quantile": quantile}
    if pbt is not None:
        population.check(spec, search.stopping(spec, args.stopping))
        if args.vectorize < spec.max_trials:
            raise ConfigError(
                f"--pbt trains the whole population at once: --vectorize {args.vectorize} is less than its "
                f"{spec.max_trials} members; use --vectorize {spec.max_trials}"
            )
    store = StudyStore(spec, url, name, args.seed, args.stopping, args.stale_after, args.storage_patience, pbt)
    driver = Driver(store, base, extra)
    logger.info(
        f"study {name}: {spec.max_trials} trials, {population.describe(spec, pbt)}"
        + (f", {driver.rule} stopping" if driver.rule != "none" else "")
        + (f", {args.vectorize} lanes" if args.vectorize > 1 else f", {spec.parallel_trials} at a time")
    )
    return driver


def run_trials(driver: Driver, vectorize: int) -> None:
    """Runs trials until none is left, waiting for trials other workers hold until they end or are taken over."""
    while True:
        if driver.store.population is not None:
            pbt.run_population(driver, **driver.store.population)
        elif vectorize > 1:
            lanes.run_lanes(driver, min(vectorize, driver.spec.max_trials))
        else:
            processes.run_processes(driver, driver.spec.parallel_trials)
        if not driver.await_work():
            return


def finish(driver: Driver) -> int:
    """study.json, study.png and the leaderboard of a study this worker has nothing more to do for."""
    summary = driver.summary()
    driver.write_summary(summary)
    storage.write_bytes_atomic(storage.join(driver.dirs.job_dir, "study.png"), record.study_png(summary))
    if summary["status"] != Status.ACTIVE:  # every trial has its own checkpoint: no lane group is needed
        with contextlib.suppress(FileNotFoundError):
            fs, path = storage.filesystem(storage.join(driver.dirs.job_dir, LANE_GROUPS_DIR))
            fs.rm(path, recursive=True)
    logger.info(record.leaderboard(summary))
    best = summary["best"]
    logger.info(
        f"best: trial {best['id']} {summary['metric']}={best['metric']:.4f} {best['params']}" if best else "best: none"
    )
    return 1 if summary["status"] == Status.FAILED else 0


def run(args: Any, extra: Sequence[str]) -> int:
    driver = open_driver(args, extra)
    record.preload()
    try:
        run_trials(driver, args.vectorize)
    except StorageDown:
        raise  # nothing can be handed back: the same command resumes this worker's trials
    except BaseException:
        driver.release_all()  # what this worker held resumes in the next one
        with contextlib.suppress(MnistJaxError):
            driver.write_summary(driver.summary())
        raise
    finally:
        driver.dirs.remove_scratch()
    return finish(driver)


def command(argv: list[str]) -> int:
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(own)
    if args.command == "convert":
        study, _ = load_study(args.config)
        print(yaml.safe_dump(to_vertex(study), sort_keys=False), end="")
        return 0
    log.configure(args.log_format, verbose=args.verbose)
    if not args.verbose:
        optuna.logging.disable_default_handler()
    return run(args, extra)
