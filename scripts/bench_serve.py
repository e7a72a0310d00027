"""Load test of the prediction server on loopback, with dynamic batching on and off.

    python scripts/bench_serve.py [--model ./tmp/mnist_mlp/model.h5] [--requests 2000]

For each mode it starts `python -m mnist_jax.serve` on a free port of
127.0.0.1, then sends a fixed number of requests (one image each) from 1, 8
and 32 concurrent clients, and prints requests per second and p50/p99
latency. Every answer is checked against the model's own forward pass (label
equal, probabilities within 1e-5); a wrong answer or a failed request stops
the benchmark. The test set of `data/mnist.pkl` supplies the images when it is
there, random images otherwise. Bounded: a fixed request count and a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import aiohttp
import numpy as np

from mnist_jax.predict import load_model

MODES = {"dynamic batching": [], "batch of one": ["--max-batch", "1", "--batch-timeout-ms", "0"]}
CONCURRENCY = (1, 8, 32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mnist_jax.serve", "--model", model, "--port", str(port), *extra],
        stderr=subprocess.PIPE,
        text=True,
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


async def load(url: str, bodies: list[bytes], expected: np.ndarray, clients: int, requests: int) -> dict:
    latencies: list[float] = []
    next_index = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal next_index
        while next_index < requests:
            i = next_index
            next_index += 1
            image = i % len(bodies)
            started = time.perf_counter()
            async with session.post(
                f"{url}/predict", data=bodies[image], headers={"Content-Type": "application/json"}
            ) as response:
                payload = await response.read()
                if response.status != 200:
                    raise SystemExit(f"request {i} failed with {response.status}: {payload[:200]!r}")
            latencies.append(time.perf_counter() - started)
            (prediction,) = json.loads(payload)["predictions"]
            probabilities = np.asarray(prediction["probabilities"])
            if (
                prediction["label"] != int(expected[image].argmax())
                or np.abs(probabilities - expected[image]).max() > 1e-5
            ):
                raise SystemExit(f"request {i}: wrong answer")

    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"rps": requests / elapsed, "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


def images(count: int) -> np.ndarray:
    if os.path.exists("data/mnist.pkl"):
        from mnist_jax import data

        return data.load("data/mnist.pkl").x_test[:count]
    return np.random.default_rng(0).integers(0, 256, (count, 784), dtype=np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="./tmp/mnist_mlp/model.h5")
    parser.add_argument("--requests", type=int, default=2000, help="requests per concurrency level")
    args = parser.parse_args()
    pixels = images(256)
    bodies = [json.dumps({"instances": [p.tolist()]}).encode() for p in pixels]
    expected = load_model(args.model)(pixels.astype(np.float32) / 255)
    results = {}
    for mode, extra in MODES.items():
        process, url = start_server(args.model, extra)
        try:
            asyncio.run(load(url, bodies, expected, 4, 200))  # warm the connections and the server
            for clients in CONCURRENCY:
                results[mode, clients] = asyncio.run(load(url, bodies, expected, clients, args.requests))
        finally:
            process.terminate()
            process.wait(timeout=60)
    print(f"\n{args.requests} requests per level, one image each, {os.cpu_count()} CPU cores, every answer checked")
    print(f"{'mode':<18}{'clients':>8}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
    for (mode, clients), r in results.items():
        print(f"{mode:<18}{clients:>8}{r['rps']:>10.0f}{r['p50']:>9.2f}{r['p99']:>9.2f}")
    for clients in CONCURRENCY:
        ratio = results["dynamic batching", clients]["rps"] / results["batch of one", clients]["rps"]
        print(f"batching / batch of one at {clients} clients: {ratio:.2f}x")


if __name__ == "__main__":
    main()
