"""The online prediction server: Vertex AI's custom-container contract on Starlette and uvicorn.

Port `$AIP_HTTP_PORT` (8080), health route `$AIP_HEALTH_ROUTE` (`/health`),
predict route `$AIP_PREDICT_ROUTE` (`/predict`), model `$AIP_STORAGE_URI` when
`--model` is absent. A request `{"instances": [...]}` is answered with
`{"predictions": [{"label", "probabilities"}, ...]}`, the numbers `python -m
mnist_jax.predict` gives, through the `batcher`. Bodies are parsed and answers
written with orjson. Client mistakes get 400 (or 413 for a body over
`--max-body-bytes`) with a one-line JSON error, and are rejected before
batching, so they never touch other requests. Health answers 503 until the
model is loaded and every batch size compiled. SIGTERM stops accepting
connections, drains requests in flight, then exits. The server logs (in
`--log-format`) when it loads the model, when it is ready and when it stops;
`--access-log` adds a line per request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import threading
import time
from collections.abc import AsyncIterator, Callable

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

from mnist_jax.common.errors import DataError, MnistJaxError
from mnist_jax.common.log import logger
from mnist_jax.serving.batcher import Batcher, Limits
from mnist_jax.serving.images import images_from_instances
from mnist_jax.serving.predict import load_model, predictions


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


class Refused(Exception):
    """A client's mistake, answered with `status` and a one-line JSON error before the request is batched."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    def response(self) -> Response:
        return _json({"error": str(self).replace("\n", " ")}, self.status)


async def request_images(request: Request, limits: Limits) -> np.ndarray:
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
        # collector stops walking it, so a full collection no longer pauses requests in the tail.
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
            images = await request_images(request, self.limits)
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
