"""Online predictions: a Vertex AI custom-container prediction server with dynamic batching.

    python -m mnist_jax.serve --model PATH [--host 127.0.0.1] [--port 8080]

Follows Vertex AI's custom-container contract: port `$AIP_HTTP_PORT` (8080),
health route `$AIP_HEALTH_ROUTE` (`/health`), predict route
`$AIP_PREDICT_ROUTE` (`/predict`), model `$AIP_STORAGE_URI` when `--model` is
absent (a `model.h5`, a directory holding one, or a checkpoints directory;
local or gs://). A request `{"instances": [...]}` (numbers, or Vertex's
`{"b64": ...}` of a PNG or raw pixels) is answered with
`{"predictions": [{"label", "probabilities"}, ...]}`, the numbers
`mnist_jax.predict` gives. Bodies are parsed and answers written with orjson.

Dynamic batching: requests waiting at the same time are gathered, up to
`--max-batch` images, run as one jitted forward pass, and split back to their
callers. A batch waits (at most `--batch-timeout-ms`) only for requests that
have already arrived and are still being parsed, so a lone request is answered
at once. Batches are padded to power-of-two sizes, all
compiled before health reports ready, so nothing compiles while serving.
Client mistakes get 400 (or 413 for a body over `--max-body-bytes`) with a
one-line JSON error, and are rejected before batching, so they never touch
other requests. SIGTERM stops accepting connections, drains requests in
flight, then exits. The server logs (in `--log-format`, as the trainer does)
when it loads the model, when it is ready (model, address, routes) and when it
stops; `--access-log` adds a line per request.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import gc
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence

import numpy as np

try:  # the `serve` extra
    import orjson
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route
except ImportError as missing:
    SERVE_EXTRA_MISSING: ImportError | None = missing
else:
    SERVE_EXTRA_MISSING = None

from mnist_jax import cli, config
from mnist_jax.errors import DataError, MnistJaxError
from mnist_jax.log import logger
from mnist_jax.predict import images_from_instances, load_model, predictions

Forward = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request and one forward pass may hold (the server's flags)."""

    max_batch: int
    batch_timeout_ms: float
    max_instances: int
    max_body_bytes: int


def bucket_sizes(largest: int) -> list[int]:
    """Powers of two up to the first one >= `largest`: the only batch shapes ever compiled."""
    sizes = [1]
    while sizes[-1] < largest:
        sizes.append(sizes[-1] * 2)
    return sizes


class Batcher:
    """Gathers concurrent requests into padded batches for one forward pass each."""

    def __init__(self, forward: Forward, limits: Limits) -> None:
        self.forward = forward
        self.max_batch = limits.max_batch
        self.timeout_s = limits.batch_timeout_ms / 1000
        self.buckets = bucket_sizes(max(limits.max_batch, limits.max_instances))
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] = asyncio.Queue()
        self._held: tuple[np.ndarray, asyncio.Future] | None = None  # didn't fit the last batch
        self.arriving = 0  # requests received but not yet queued (being read and parsed)
        # One thread runs the forward passes, so the event loop keeps accepting requests meanwhile.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")

    def warm_up(self) -> None:
        """Compiles every bucket (call before reporting healthy)."""
        for size in self.buckets:
            self.forward(np.zeros((size, 784), np.float32))

    def padded_forward(self, images: np.ndarray) -> np.ndarray:
        size = next(b for b in self.buckets if b >= len(images))
        padded = np.zeros((size, images.shape[1]), np.float32)
        padded[: len(images)] = images
        return self.forward(padded)[: len(images)]

    async def predict(self, images: np.ndarray) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((images, future))
        return await future

    async def _next_item(self, timeout: float | None) -> tuple[np.ndarray, asyncio.Future] | None:
        if self._held is not None:
            item, self._held = self._held, None
            return item
        if timeout is None:
            return await self._queue.get()
        if not self._queue.empty():
            return self._queue.get_nowait()
        if timeout <= 0 or self.arriving == 0:  # nobody else is on the way: don't wait
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next_item(None)
            batch, count = [first], len(first[0])
            deadline = loop.time() + self.timeout_s
            while count < self.max_batch:
                item = await self._next_item(deadline - loop.time())
                if item is None:
                    break
                if count + len(item[0]) > self.max_batch:
                    self._held = item
                    break
                batch.append(item)
                count += len(item[0])
            images = np.concatenate([images for images, _ in batch])
            try:
                probabilities = await loop.run_in_executor(self._executor, self.padded_forward, images)
            except Exception as e:  # a server fault: every caller of this batch gets a 500
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            start = 0
            for request_images, future in batch:
                if not future.done():  # a caller may have gone away
                    future.set_result(probabilities[start : start + len(request_images)])
                start += len(request_images)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


class Refused(Exception):
    """A client's mistake, answered with `status` and a one-line JSON error before the request is batched."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    def response(self) -> Response:
        return _json({"error": str(self).replace("\n", " ")}, self.status)


async def read_images(request: Request, limits: Limits) -> np.ndarray:
    """A request's images, read within `limits.max_body_bytes` and checked; a client's mistake raises `Refused`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise Refused(413, f"request body over {limits.max_body_bytes} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_body_bytes:
            raise Refused(413, f"request body over {limits.max_body_bytes} bytes")
    try:
        images = images_from_instances(orjson.loads(body))
    except orjson.JSONDecodeError as e:
        raise Refused(400, f"malformed JSON: {e}") from None
    except (DataError, RecursionError) as e:
        raise Refused(400, str(e)) from None
    if len(images) > limits.max_instances:
        raise Refused(400, f"{len(images)} instances in one request; the limit is {limits.max_instances}")
    return images


class Service:
    """The model behind the routes: loaded and compiled in the background after start-up, then fed to one
    `Batcher`; health says 503 until then. A model that cannot be loaded stops the server (`load_error`)."""

    def __init__(self, model_path: str, limits: Limits, where: str) -> None:
        self.model_path, self.limits, self.where = model_path, limits, where
        self.batcher: Batcher | None = None
        self.ready = threading.Event()
        self.load_error: str | None = None

    def load(self) -> None:
        logger.info(f"loading {self.model_path}")
        batcher = Batcher(load_model(self.model_path), self.limits)
        batcher.warm_up()
        # What exists now (JAX, the model, the libraries) lives as long as the server: frozen, the cyclic
        # collector stops walking it, so a full collection no longer pauses requests (README, Serving).
        gc.collect()
        gc.freeze()
        self.batcher = batcher
        self.ready.set()
        logger.info(
            f"ready: serving {self.model_path} on {self.where} "
            f"(batches of up to {self.limits.max_batch} images, compiled)"
        )

    async def health(self, request: Request) -> Response:
        if not self.ready.is_set():
            return _json({"status": "loading"}, 503)
        return _json({"status": "ok"})

    async def predict(self, request: Request) -> Response:
        if not self.ready.is_set():
            return Refused(503, "model is not loaded yet").response()
        batcher = self.batcher
        batcher.arriving += 1  # a batch may wait for this request while it is read
        try:
            images = await read_images(request, self.limits)
        except Refused as refused:
            return refused.response()
        finally:
            batcher.arriving -= 1
        return _json(predictions(await batcher.predict(images)))

    async def load_then_serve(self, app: Starlette) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.load)
        except MnistJaxError as e:  # nothing to serve: say why and shut down
            self.load_error = str(e)
            app.state.server.should_exit = True
            return
        await self.batcher.run()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(self.load_then_serve(app))
        try:
            yield
        finally:  # after uvicorn has drained the requests in flight
            logger.info("stopped: the requests in flight were answered")
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if self.batcher is not None:
                self.batcher.close()


def create_app(service: Service, health_route: str, predict_route: str) -> Starlette:
    """The Starlette app of `service` on the two Vertex routes; set `app.state.server` before it starts."""
    return Starlette(
        routes=[
            Route(health_route, service.health, methods=["GET"]),
            Route(predict_route, service.predict, methods=["POST"]),
        ],
        lifespan=service.lifespan,
    )


class AccessLog:
    """ASGI middleware: one line per request (client, method, path, status, milliseconds), in the log's format."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [0]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            client = "{}:{}".format(*scope["client"]) if scope.get("client") else "-"
            elapsed = 1000 * (time.perf_counter() - started)
            logger.info(f'{client} "{scope["method"]} {scope["path"]}" {status[0]} {elapsed:.1f} ms')


def build_parser() -> argparse.ArgumentParser:
    parser = config.Parser(prog="python -m mnist_jax.serve", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default=os.environ.get("AIP_STORAGE_URI"),
        help="model.h5, a directory holding it, or a checkpoints directory (default: $AIP_STORAGE_URI)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (a container passes 0.0.0.0)")
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("AIP_HTTP_PORT", "8080")),
        help="port (default: $AIP_HTTP_PORT, else 8080)",
    )
    parser.add_argument("--max-batch", type=int, default=64, help="most images in one forward pass (1: no batching)")
    parser.add_argument(
        "--batch-timeout-ms", type=float, default=2.0, help="how long a batch waits for more requests after its first"
    )
    parser.add_argument("--max-instances", type=int, default=128, help="most instances in one request")
    parser.add_argument("--max-body-bytes", type=int, default=8 << 20, help="largest request body")
    parser.add_argument("--access-log", action="store_true", help="log a line per request")
    config.add_flags(parser, config.OUTPUT_FLAGS)
    return parser


def serve(args: argparse.Namespace) -> None:
    """Serves until SIGTERM; a model that cannot be loaded ends it with one line."""
    if SERVE_EXTRA_MISSING is not None:
        raise MnistJaxError(f"the server needs the serve extra: pip install 'mnist-jax[serve]' ({SERVE_EXTRA_MISSING})")
    if not args.model:
        raise MnistJaxError("no model: pass --model or set AIP_STORAGE_URI")
    health_route = os.environ.get("AIP_HEALTH_ROUTE", "/health")
    predict_route = os.environ.get("AIP_PREDICT_ROUTE", "/predict")
    limits = Limits(args.max_batch, args.batch_timeout_ms, args.max_instances, args.max_body_bytes)
    where = f"http://{args.host}:{args.port}: GET {health_route}, POST {predict_route}"
    service = Service(args.model, limits, where)
    app = create_app(service, health_route, predict_route)
    asgi = AccessLog(app) if args.access_log else app
    server = uvicorn.Server(
        uvicorn.Config(asgi, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30)
    )
    app.state.server = server
    server.run()
    if service.load_error:
        raise MnistJaxError(f"cannot load the model: {service.load_error}")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(build_parser(), argv, serve)


if __name__ == "__main__":
    sys.exit(main())
