"""Load test of the prediction server on loopback: dynamic batching against batch-of-one serving.

    python scripts/bench_serve.py [--model ./tmp/mnist_mlp/model.h5] [--seconds 10] [--requests 2000]

For each mode it starts `python -m mnist_jax.serve` on a free port of
127.0.0.1 and loads it from 1, 8 and 32 connections, one image per request,
with two bodies: JSON numbers and Vertex's `{"b64": ...}` of a PNG. With `wrk`
installed (Debian's `wrk`), wrk runs for `--seconds` per level, pinned to the
last CPU core and the server to the others, so client and server do not share
a core; without it, an aiohttp client in this process sends `--requests`
requests per level. It prints requests per second and p50/p90/p99 latency,
and the batching/batch-of-one throughput ratio. A failed request stops the
benchmark, and after each level a sample of answers is checked against the
model's own forward pass (label equal, probabilities within `--atol`, 1e-5). The test
set of `data/mnist.pkl` supplies the images when it is there, random images
otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
from PIL import Image

from mnist_jax.serving.predict import load_model

MODES = {"dynamic batching": [], "batch of one": ["--max-batch", "1", "--batch-timeout-ms", "0"]}
CONCURRENCY = (1, 8, 32)
SAMPLE = 64  # answers checked after each level


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, extra: list[str], cores: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "mnist_jax.serve", "--model", model, "--port", str(port), *extra]
    process = subprocess.Popen(
        ["taskset", "-c", cores, *command] if cores else command, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=1).status == 200:
                return process, url
        except OSError:
            time.sleep(0.1)
        if process.poll() is not None:
            raise SystemExit(f"server exited: {process.stderr.read()}")
    process.kill()
    raise SystemExit("server did not become healthy")


def bodies(pixels: np.ndarray) -> dict[str, list[bytes]]:
    """One request body per image: JSON numbers, and b64 PNG."""

    def png(p: np.ndarray) -> str:
        buffer = io.BytesIO()
        Image.fromarray(p.reshape(28, 28)).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    return {
        "json": [json.dumps({"instances": [p.tolist()]}).encode() for p in pixels],
        "b64": [json.dumps({"instances": [{"b64": png(p)}]}).encode() for p in pixels],
    }


def check(url: str, payloads: list[bytes], expected: np.ndarray, atol: float) -> float:
    """Sends a sample of requests, compares every answer with the model's own forward pass; returns the
    largest difference of a probability."""
    largest = 0.0
    for i in range(0, len(payloads), max(1, len(payloads) // SAMPLE)):
        request = urllib.request.Request(f"{url}/predict", payloads[i], {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            (prediction,) = json.loads(response.read())["predictions"]
        difference = float(np.abs(np.asarray(prediction["probabilities"]) - expected[i]).max())
        largest = max(largest, difference)
        if prediction["label"] != int(expected[i].argmax()) or difference > atol:
            raise SystemExit(f"image {i}: the server's answer differs from mnist_jax.predict's by {difference:.2e}")
    return largest


def with_wrk(url: str, payload: bytes, clients: int, seconds: int, core: str) -> dict:
    script = "\n".join(
        [
            'wrk.method = "POST"',
            'wrk.headers["Content-Type"] = "application/json"',
            f"wrk.body = {json.dumps(payload.decode())}",
        ]
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    command = ["taskset", "-c", core, "wrk", "-t1", f"-c{clients}", f"-d{seconds}s", "--latency", "-s", f.name]
    output = subprocess.run([*command, f"{url}/predict"], capture_output=True, text=True, check=True).stdout
    os.unlink(f.name)
    if "Non-2xx" in output or "Socket errors" in output:
        raise SystemExit(f"requests failed:\n{output}")

    def ms(label: str) -> float:
        value, unit = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)\b", output).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    return {"rps": rps, "p50": ms("50"), "p90": ms("90"), "p99": ms("99")}


async def with_aiohttp(url: str, payloads: list[bytes], clients: int, requests: int) -> dict:
    import aiohttp

    latencies: list[float] = []
    next_index = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal next_index
        while next_index < requests:
            i = next_index
            next_index += 1
            started = time.perf_counter()
            async with session.post(
                f"{url}/predict", data=payloads[i % len(payloads)], headers={"Content-Type": "application/json"}
            ) as response:
                body = await response.read()
                if response.status != 200:
                    raise SystemExit(f"request {i} failed with {response.status}: {body[:200]!r}")
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"rps": requests / elapsed, **{f"p{q}": float(np.percentile(ms, q)) for q in (50, 90, 99)}}


def images(count: int) -> np.ndarray:
    if os.path.exists("data/mnist.pkl"):
        from mnist_jax.data import dataset

        return dataset.load("data/mnist.pkl").x_test[:count]
    return np.random.default_rng(0).integers(0, 256, (count, 784), dtype=np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="./tmp/mnist_mlp/model.h5")
    parser.add_argument("--seconds", type=int, default=10, help="wrk: seconds per level")
    parser.add_argument("--requests", type=int, default=2000, help="without wrk: requests per level")
    parser.add_argument("--atol", type=float, default=1e-5, help="largest difference allowed from mnist_jax.predict")
    args = parser.parse_args()
    pixels = images(256)
    payloads = bodies(pixels)
    expected = load_model(args.model)(pixels.astype(np.float32) / 255)
    cores = sorted(os.sched_getaffinity(0))
    wrk = shutil.which("wrk") is not None and shutil.which("taskset") is not None and len(cores) > 1
    client_core, server_cores = str(cores[-1]), ",".join(map(str, cores[:-1]))
    results, largest = {}, 0.0
    for mode, extra in MODES.items():
        process, url = start_server(args.model, extra, server_cores if wrk else None)
        try:
            for body, sample in payloads.items():
                largest = max(largest, check(url, sample, expected, args.atol))  # also warms the server up
                for clients in CONCURRENCY:
                    if wrk:
                        results[mode, body, clients] = with_wrk(url, sample[0], clients, args.seconds, client_core)
                    else:
                        results[mode, body, clients] = asyncio.run(with_aiohttp(url, sample, clients, args.requests))
                    largest = max(largest, check(url, sample, expected, args.atol))
        finally:
            process.terminate()
            process.wait(timeout=60)
    client = f"wrk on core {client_core}, server on {server_cores}" if wrk else "aiohttp client sharing the cores"
    print(f"\none image per request, {len(cores)} CPU cores, {client}")
    print(f"every sampled answer has mnist_jax.predict's label; largest probability difference {largest:.1e}")
    print(f"{'mode':<18}{'body':>6}{'clients':>9}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}")
    for (mode, body, clients), r in results.items():
        print(f"{mode:<18}{body:>6}{clients:>9}{r['rps']:>9.0f}{r['p50']:>9.2f}{r['p90']:>9.2f}{r['p99']:>9.2f}")
    for body in payloads:
        for clients in CONCURRENCY:
            batched, one = results["dynamic batching", body, clients], results["batch of one", body, clients]
            print(
                f"{body} at {clients} clients: batching / batch of one {batched['rps'] / one['rps']:.2f}x, "
                f"batching p99 / p50 {batched['p99'] / batched['p50']:.2f}"
            )


if __name__ == "__main__":
    main()
