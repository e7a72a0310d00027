"""Studies shared for real: a PostgreSQL server, workers on two hosts (their own UTS namespaces), a server that
restarts or stays down, wrong credentials, a killed host's trial taken over, and optuna-dashboard reading it all."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from gcs import free_port
from helpers import REPO, run_here, run_process, tiny_args, trainer_env, wait_for, write_study
from pg import PASSWORD, PostgreSQL, can_run

pytestmark = pytest.mark.xdist_group("postgres")  # one worker, so one server for the module


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    reason = can_run()
    if reason is not None:
        pytest.skip(f"no PostgreSQL server can be had: {reason}")
    server = PostgreSQL(tmp_path_factory.mktemp("postgres"))
    yield server
    server.stop()


REVERSE_LOG_DROPOUT = {
    "parameterId": "dropout-one",
    "doubleValueSpec": {"minValue": 0.1, "maxValue": 0.5},
    "scaleType": "UNIT_REVERSE_LOG_SCALE",
}


def _study(path: Path, trials: int) -> str:
    rates = {"parameterId": "learning-rate", "discreteValueSpec": {"values": [1e-3 * i for i in range(1, trials + 1)]}}
    return write_study(path, [rates, REVERSE_LOG_DROPOUT], algorithm="RANDOM_SEARCH", maxTrialCount=trials)


def _worker(host: str | None, args: list[str], log: Path) -> subprocess.Popen:
    """`tune run ARGS` as a worker on `host`: in a UTS namespace of its own with that hostname (None: this
    host's), its output in `log`."""
    with open(log, "w") as out:
        if host is None:
            return run_process("tune", ["run", *args], stdout=out, stderr=subprocess.STDOUT, wait=False)
        if shutil.which("unshare") is None:
            pytest.skip("needs unshare (util-linux) for a second hostname")
        # A raw Popen, not run_process: the worker runs inside an `unshare` shell that sets its hostname first.
        command = [sys.executable, "-m", "mnist_jax.tune", "run", *args]
        command = ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *command]
        return subprocess.Popen(command, cwd=REPO, env=trainer_env(1), stdout=out, stderr=subprocess.STDOUT)


def _run_args(tmp_path: Path, url: str, train_file: Path, trials: int, *extra: str, epochs: int = 4) -> list[str]:
    """`tune run` flags of a `trials`-trial study (`_study`) in job dir `tmp_path/study`, stored at `url`."""
    study = _study(tmp_path / "study.yaml", trials)
    trainer = [*tiny_args(train_file, epochs), "--checkpoint-every", "1"]
    return ["--config", study, "--job-dir", str(tmp_path / "study"), "--storage", url, *extra, "--", *trainer]


def _ids_started(*logs: Path) -> list[int]:
    return [int(m) for log in logs for m in re.findall(r"trial (\d+): starting", log.read_text())]


@pytest.mark.slow
def test_two_hosts_share_a_study_through_a_server_restart(postgres, slow_data, tmp_path):
    args = _run_args(tmp_path, postgres.url(), slow_data, 6, "--vectorize", "2", "--study-name", "restart")
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    workers = [_worker(host, args, log) for host, log in zip(("host-a", "host-b"), logs)]
    wait_for(
        lambda: any("Epoch 1/" in p.read_text() for p in (tmp_path / "study").glob("trial-*/train.log")), workers[0]
    )
    postgres.stop("immediate")  # as a failover does: every connection cut, no shutdown
    time.sleep(3)
    postgres.start()
    codes = [w.wait(timeout=300) for w in workers]
    assert codes == [0, 0], [log.read_text()[-2000:] for log in logs]
    summary = json.loads((tmp_path / "study" / "study.json").read_text())
    assert sorted(t["id"] for t in summary["trials"]) == [1, 2, 3, 4, 5, 6]
    assert {t["status"] for t in summary["trials"]} == {"SUCCEEDED"}
    assert sorted(_ids_started(*logs)) == [1, 2, 3, 4, 5, 6]  # each trial once, by one worker
    assert {t["worker"].split(":")[0] for t in summary["trials"]} == {"host-a", "host-b"}
    assert all(len(t["measurements"]) == 4 for t in summary["trials"])  # no report lost in the outage
    assert "is not answering" in "".join(log.read_text() for log in logs)  # it did ride through one
    assert "Traceback" not in "".join(log.read_text() for log in logs)


@pytest.mark.slow
def test_a_killed_hosts_trial_is_taken_over_after_stale_after_and_resumed(postgres, slow_data, tmp_path):
    takeover = ["--vectorize", "2", "--stale-after", "4", "--study-name", "takeover"]
    args = _run_args(tmp_path, postgres.url(), slow_data, 4, *takeover, epochs=6)
    logs = {host: tmp_path / f"{host}.log" for host in ("host-a", "host-b")}
    a, b = (_worker(host, args, log) for host, log in logs.items())
    for worker, log in zip((a, b), logs.values()):
        wait_for(lambda log=log: len(_ids_started(log)) == 2, worker)  # each holds two trials
    held = _ids_started(logs["host-a"])
    groups = tmp_path / "study" / "lanes"
    wait_for(lambda: any((g / "2").is_dir() for g in groups.glob("host-a-*")), a)  # host-a's lanes saved twice
    a.send_signal(signal.SIGKILL)
    assert a.wait(timeout=30) == -signal.SIGKILL
    assert b.wait(timeout=300) == 0, logs["host-b"].read_text()[-3000:]
    b_log = logs["host-b"].read_text()
    summary = json.loads((tmp_path / "study" / "study.json").read_text())
    assert sorted(t["id"] for t in summary["trials"]) == [1, 2, 3, 4]
    assert {t["status"] for t in summary["trials"]} == {"SUCCEEDED"}
    for n in held:  # host-b took host-a's trials over once its heartbeat was 4 s old, from their group's copy
        assert f"trial {n}: resuming" in b_log
        resumed = re.findall(r"Resuming from epoch (\d+)", (tmp_path / f"study/trial-{n}/train.log").read_text())
        assert resumed and int(resumed[-1]) >= 2
        (record,) = [t for t in summary["trials"] if t["id"] == n]
        assert record["worker"].startswith("host-b:") and [e for e, _ in record["measurements"]] == list(range(1, 7))


@pytest.mark.slow
def test_a_server_that_stays_down_ends_the_worker_in_one_line_and_the_same_command_resumes(
    postgres, slow_data, tmp_path
):
    patient = ["--vectorize", "2", "--storage-patience", "3", "--study-name", "down"]
    args = _run_args(tmp_path, postgres.url(), slow_data, 2, *patient, epochs=4)
    worker = _worker(None, args, tmp_path / "w.log")
    wait_for(lambda: "Epoch 1/" in (tmp_path / "study/trial-1/train.log").read_text()
             if (tmp_path / "study/trial-1/train.log").exists() else False, worker)  # fmt: skip
    postgres.stop("fast")
    try:
        assert worker.wait(timeout=120) == 2
    finally:
        postgres.start()
    lines = [line for line in (tmp_path / "w.log").read_text().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "has not answered for 3 s" in lines[0] and "rerun the same command" in lines[0]
    assert PASSWORD not in (tmp_path / "w.log").read_text() and "Traceback" not in (tmp_path / "w.log").read_text()
    again = run_here("tune", ["run", *args])
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((tmp_path / "study" / "study.json").read_text())
    assert sorted(t["id"] for t in summary["trials"]) == [1, 2] and {t["status"] for t in summary["trials"]} == {
        "SUCCEEDED"
    }


@pytest.mark.parametrize("url_of", ["wrong password", "nobody listening"])
def test_bad_credentials_or_an_unreachable_server_is_one_line(postgres, tiny_pickle, tmp_path, url_of):
    url = {
        "wrong password": postgres.url(password="not-the-password"),
        "nobody listening": postgres.url().replace(f":{postgres.port}/", f":{free_port()}/"),
    }[url_of]
    result = run_here("tune", ["run", *_run_args(tmp_path, url, tiny_pickle, 1)])
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot open study storage postgresql+psycopg://tuner:***@127.0.0.1:")
    assert "not-the-password" not in line and PASSWORD not in line
    assert {"wrong password": "password authentication failed", "nobody listening": "refused"}[url_of] in line


def _dashboard(url: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    # A raw Popen, not run_process: optuna-dashboard is a program of its own, not one of mnist_jax's entry points.
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "optuna-dashboard"), url, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def up() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(up, process, timeout=60)
    return process, port


def _get(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_optuna_dashboard_reads_every_trial_of_a_finished_study(backend, request, learnable_pickle, tmp_path):
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard (the dashboard extra) is not installed")
    job_dir = tmp_path / "study"
    url = request.getfixturevalue("postgres").url() if backend == "postgresql" else f"sqlite:///{job_dir}/study.db"
    rates = {"parameterId": "learning-rate", "discreteValueSpec": {"values": [2e-3, 1e-5, 1.5e-3, 2e-5]}}
    config = write_study(
        tmp_path / "study.yaml", [rates, REVERSE_LOG_DROPOUT], algorithm="RANDOM_SEARCH", maxTrialCount=4
    )
    args = ["--config", config, "--job-dir", str(job_dir), "--study-name", f"dash-{backend}"]
    args += ["--storage", url] if backend == "postgresql" else []  # sqlite: the default, <job-dir>/study.db
    result = run_here(
        "tune", ["run", *args, "--vectorize", "4", "--stopping", "halving", "--", *tiny_args(learnable_pickle, 3)]
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((job_dir / "study.json").read_text())
    process, port = _dashboard(url)
    try:
        (study,) = [s for s in _get(port, "/api/studies")["study_summaries"] if s["study_name"] == f"dash-{backend}"]
        detail = _get(port, f"/api/studies/{study['study_id']}")
    finally:
        process.terminate()
        process.wait(timeout=30)
    trials = {t["number"] + 1: t for t in detail["trials"]}  # the dashboard counts from 0
    assert sorted(trials) == sorted(t["id"] for t in summary["trials"])
    for ours in summary["trials"]:
        theirs = trials[ours["id"]]
        assert theirs["state"] == {"SUCCEEDED": "Complete", "STOPPED": "Pruned"}[ours["status"]]
        assert [[v["step"], v["value"]] for v in theirs["intermediate_values"]] == ours["measurements"]
        attrs = {a["key"]: a["value"] for a in theirs["user_attrs"]}
        assert attrs["trial"] == str(ours["id"])  # the number the user knows
        for name, value in ours["params"].items():  # each parameter's real value, reverse-log ones included
            assert float(attrs[name]) == pytest.approx(value)
        mirrored = {p["name"]: float(p["param_external_value"]) for p in theirs["params"]}
        assert mirrored["dropout-one:mirrored"] == pytest.approx(0.1 + 0.5 - ours["params"]["dropout-one"])
