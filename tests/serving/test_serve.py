"""The prediction server over real HTTP on 127.0.0.1: answers, batching, bad input, health, SIGTERM."""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import io
import json
import signal
import time

import fsspec
import numpy as np
import pytest
from PIL import Image

from mnist_jax.serving.predict import load_model

from gcs import FaultyProxy, free_port
from helpers import run_process

pytestmark = pytest.mark.xdist_group("serve")  # one worker, so one server for the module

MAX_INSTANCES = 8
MAX_BODY = 128_000


class Server:
    def __init__(self, model: str, *args: str, env: dict | None = None, stdout=None) -> None:
        self.port = free_port()
        limits = ["--max-instances", str(MAX_INSTANCES), "--max-body-bytes", str(MAX_BODY)]
        self.process = run_process(
            "serve", ["--model", model, "--port", str(self.port), *limits, *args], env=env, stdout=stdout, wait=False
        )

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    def wait_listening(self) -> int:
        """Polls health until the port answers; returns the first status seen."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stderr.read()
            try:
                return self.request("GET", "/health")[0]
            except OSError:
                time.sleep(0.02)
        raise AssertionError("server did not listen")

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + 120
        while self.wait_listening() != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(trained_job):
    running = Server(str(trained_job / "model.h5"))
    running.wait_healthy()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def digits():
    return np.random.default_rng(5).integers(0, 256, (40, 784), dtype=np.uint8)


def _predict(server, instances) -> tuple[int, dict]:
    return server.request("POST", "/predict", json.dumps({"instances": instances}).encode())


def test_predictions_equal_mnist_jax_predict(server, trained_job, digits):
    expected = load_model(str(trained_job / "model.h5"))(digits[:5].astype(np.float32) / 255)
    instances = [
        digits[0].tolist(),
        digits[1].reshape(28, 28).tolist(),
        (digits[2] / 255).tolist(),
        digits[3].tolist(),
        digits[4].tolist(),
    ]
    status, body = _predict(server, instances)
    assert status == 200
    probabilities = np.array([p["probabilities"] for p in body["predictions"]])
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)
    assert [p["label"] for p in body["predictions"]] == expected.argmax(1).tolist()


def _b64_png(pixels: np.ndarray, size: int = 28) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels.reshape(28, 28)).resize((size, size)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_b64_png_and_raw_instances(server, trained_job, digits):
    expected = load_model(str(trained_job / "model.h5"))(digits[:3].astype(np.float32) / 255)
    instances = [
        {"b64": _b64_png(digits[0])},
        {"b64": base64.b64encode(digits[1].tobytes()).decode()},
        digits[2].tolist(),
    ]
    status, body = _predict(server, instances)
    assert status == 200, body
    np.testing.assert_allclose([p["probabilities"] for p in body["predictions"]], expected, atol=1e-6)


BAD_B64 = {
    "not base64": ({"b64": "not*base64"}, "instance 1: b64 is not valid base64"),
    "wrong size": ({"b64": base64.b64encode(bytes(100)).decode()}, "neither a PNG nor 784 raw pixels (100 bytes)"),
    "big png": (None, "instance 1: PNG must be 28x28, got 56x56"),
    "bad key": ({"image": "x"}, 'instance 1: an object instance must be {"b64": "<base64>"}'),
    "too long": ({"b64": "A" * 70_000}, "b64 payload of 70000 characters is over 65536"),
}


@pytest.mark.parametrize("case", list(BAD_B64))
def test_bad_b64_gets_a_400_naming_the_instance(server, digits, case):
    instance, message = BAD_B64[case]
    if instance is None:
        instance = {"b64": _b64_png(digits[0], size=56)}
    status, answer = server.request(
        "POST", "/predict", json.dumps({"instances": [digits[0].tolist(), instance]}).encode()
    )
    assert status == 400 and message in answer["error"], answer


BAD = {
    "malformed json": (b'{"instances": [1, 2', 400, "malformed JSON"),
    "no instances": (b'{"inputs": []}', 400, '"instances"'),
    "wrong shape": (json.dumps({"instances": [[0] * 783]}).encode(), 400, "784 or 28x28"),
    "out of range": (json.dumps({"instances": [[0.5] * 783 + [1.5]]}).encode(), 400, "in [0, 1]"),
    "too many": (json.dumps({"instances": [[0] * 784] * (MAX_INSTANCES + 1)}).encode(), 400, "the limit is 8"),
    "too big": (b'{"instances": [' + b"0, " * 80_000 + b"0]}", 413, "over 128000 bytes"),
    "bad pixel": (
        json.dumps({"instances": [[0] * 783 + [256]]}).encode(),
        400,
        "instance 0 has integer pixels outside",
    ),
    "ragged": (json.dumps({"instances": [[0] * 784, [0] * 10]}).encode(), 400, "instance 1 must be 784 or 28x28"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_4xx_with_one_line_json(server, case):
    body, expected_status, message = BAD[case]
    status, answer = server.request("POST", "/predict", body)
    assert status == expected_status
    assert message in answer["error"] and "\n" not in answer["error"]


def test_bad_requests_do_not_disturb_good_ones(server, trained_job, digits):
    expected = load_model(str(trained_job / "model.h5"))(digits.astype(np.float32) / 255)
    jobs = [("good", i) for i in range(len(digits))] + [("bad", case) for case in BAD] * 2
    np.random.default_rng(0).shuffle(jobs)

    def send(job):
        kind, key = job
        if kind == "good":
            return job, _predict(server, [digits[key].tolist()])
        return job, server.request("POST", "/predict", BAD[key][0])

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for (kind, key), (status, body) in pool.map(send, jobs):
            if kind == "good":
                assert status == 200
                np.testing.assert_allclose(body["predictions"][0]["probabilities"], expected[key], atol=1e-6)
            else:
                assert status == BAD[key][1]
    assert server.request("GET", "/health") == (200, {"status": "ok"})


def test_health_is_503_until_the_model_is_loaded(trained_job, gcs_env, fake_gcs, digits):
    fsspec.filesystem("gs").pipe_file("bucket/serve/model.h5", (trained_job / "model.h5").read_bytes())
    proxy = FaultyProxy(fake_gcs.port, plan=())
    proxy.gate.clear()  # storage holds the model back
    server = Server("gs://bucket/serve/model.h5", env=fake_gcs.env(proxy.url))
    try:
        assert server.wait_listening() == 503
        assert server.request("POST", "/predict", json.dumps({"instances": [[0] * 784]}).encode())[0] == 503
        proxy.gate.set()
        server.wait_healthy()
        status, body = _predict(server, [digits[0].tolist()])
        assert status == 200 and len(body["predictions"][0]["probabilities"]) == 10
    finally:
        server.stop()
        proxy.shutdown()


def test_unloadable_model_is_a_one_line_error(tmp_path):
    server = Server(str(tmp_path / "missing.h5"))
    _, stderr = server.process.communicate(timeout=120)
    assert server.process.returncode == 2
    assert (
        stderr.strip().splitlines()[-1] == f"error: cannot load the model: model file not found: {tmp_path}/missing.h5"
    )


def test_sigterm_drains_requests_in_flight_and_the_server_logs_it_all_as_json(trained_job, digits, tmp_path):
    with open(tmp_path / "out", "w") as out:
        server = Server(str(trained_job / "model.h5"), "--access-log", "--log-format", "json", stdout=out)
        server.wait_healthy()
        assert server.request("POST", "/predict", json.dumps({"instances": [digits[0].tolist()]}).encode())[0] == 200
        body = json.dumps({"instances": [digits[1].tolist()]}).encode()
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        connection.putrequest("POST", "/predict")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body[:100])  # the request has begun...
        time.sleep(0.3)
        server.process.send_signal(signal.SIGTERM)  # ...when the scheduler stops the container
        time.sleep(0.3)
        connection.send(body[100:])
        response = connection.getresponse()
        assert response.status == 200
        assert len(json.loads(response.read())["predictions"]) == 1
        # uvicorn shuts down gracefully, then lets the SIGTERM end the process as it would have.
        assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
    assert "Traceback" not in server.process.stderr.read()
    entries = [json.loads(line) for line in (tmp_path / "out").read_text().splitlines()]
    assert {e["severity"] for e in entries} == {"INFO"}
    messages = [e["message"] for e in entries]
    assert messages[0] == f"loading {trained_job / 'model.h5'}"
    ready = messages.index(
        f"ready: serving {trained_job / 'model.h5'} on http://127.0.0.1:{server.port}: GET /health, POST /predict "
        "(batches of up to 64 images, compiled)"
    )
    posted = [i for i, m in enumerate(messages) if '"POST /predict" 200 ' in m]  # before the SIGTERM, and in flight
    assert len(posted) == 2 and ready < posted[0]
    assert all(messages[i].startswith("127.0.0.1:") and messages[i].endswith(" ms") for i in posted)
    assert any('"GET /health" ' in m for m in messages)
    assert messages[-1] == "stopped: the requests in flight were answered"
