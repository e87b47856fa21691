"""Registry-based serving: a REST service that answers with ``models:/NAME@ALIAS`` and follows it.

Routes (JSON in and out; an error is ``{"error_code": ..., "message": ...}``, never a traceback):

- ``GET /health``: the process is up (open even when a token is set);
- ``GET /ready``: a version is loaded, smoke-tested and warmed up (503 until then; open);
- ``GET /models/NAME``: the served version, its run, lineage tags, input schema, refused versions;
- ``POST /models/NAME/predictions``: ``{"rows": [{column: number, ...}, ...]}`` in; per row
  ``label``, ``probabilities``, ``anomaly_score`` and ``is_anomaly`` out;
- ``POST /invocations`` and ``GET /ping``: MLflow's scoring contract, for MLflow's own clients;
- ``GET /openapi.json`` and ``GET /docs``: the OpenAPI document (:mod:`trackflow.serving.openapi`:
  the served version's exact columns and ranges) and Swagger UI.

A :class:`ModelFollower` thread reads the alias every ``poll_interval_s``. A new version is loaded,
smoke-tested on its input example and warmed up off the request path, then swapped in by one
reference assignment: a request keeps the version it was checked against until it is answered,
and every scored response names its version in ``X-Model-Version``. A version that fails through
its own fault (it does not load, is not a trackflow model, or fails its smoke test) is refused
(reported on ``GET /models/NAME``, not retried); a transient failure (a locked store, an artifact
store out of reach) is retried at the next poll. Either way the old version keeps serving.

Rows are checked as the model's :meth:`~trackflow.registry.packaging.Scorer.check` checks them
(:func:`~trackflow.data.inputs.check_rows`; NaN and ``null`` allowed if the model imputes; values
within the model's range): plain JSON numbers under exactly the model's columns go straight to an
array, range-checked; anything else goes through ``Scorer.check``, which accepts or refuses it
with its message. Rows are checked before they are batched: concurrent requests are scored
together (:class:`Batcher`; a call of the packaged model costs little more for 64 rows than for 1),
and a batch that fails is scored again request by request, so a request fails only by its own rows.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from trackflow import __version__
from trackflow.data.inputs import InputError
from trackflow.serving import openapi as serving_api
from trackflow.serving.batching import Batcher
from trackflow.serving.follower import ModelFollower
from trackflow.serving.model import ServedModel
from trackflow.serving.rows import RequestError, invocation_rows, prediction_rows

if TYPE_CHECKING:
    from trackflow.config import ServeConfig
    from trackflow.tracking import Tracking

log = logging.getLogger(__name__)

#: Environment variable holding the bearer token; unset or empty = no authentication.
TOKEN_VARIABLE = "TRACKFLOW_API_TOKEN"
ERROR_CODES = {
    400: "MALFORMED_REQUEST",
    401: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "INVALID_INPUT",
    500: "INTERNAL_ERROR",
    503: "NOT_READY",
}
_WARM_UP = "trackflow.warm_up"  # in the scope of the requests the app sends itself at start


@dataclass(frozen=True)
class ServeSettings:
    """What the service serves, how often it reads the alias, and what it accepts.

    Built by :meth:`from_config` from the params' ``serve`` section, which holds the defaults.
    """

    name: str
    alias: str
    poll_interval_s: float
    max_rows: int
    max_body_bytes: int
    token: str | None
    access_log: bool

    @classmethod
    def from_config(cls, name: str, config: ServeConfig, token: str | None) -> ServeSettings:
        """Settings to serve registered model ``name`` as ``config`` says; ``token``: bearer."""
        return cls(
            name=name,
            alias=config.alias,
            poll_interval_s=config.poll_interval_s,
            max_rows=config.max_rows,
            max_body_bytes=int(config.max_body_mb * 2**20),
            token=token or None,
            access_log=config.access_log,
        )


def create_app(follower: ModelFollower, settings: ServeSettings) -> FastAPI:
    """The service's ASGI app; it starts and stops ``follower`` with itself."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await _warm_routes(app, follower.name, settings.token)
        follower.start()
        yield
        await asyncio.to_thread(follower.stop)  # joins the follower's thread: not in the loop

    # /openapi.json and /docs are routes of their own below, behind the token when one is set.
    app = FastAPI(
        title="trackflow",
        version=__version__,
        description=__doc__.split("\n\n")[0],
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    batcher = Batcher(settings.max_rows)
    # On the app itself, not an included APIRouter: FastAPI builds an included router's routes
    # on the first request that reaches them (~4 ms, paid by a client).
    guarded = [Depends(_bearer(settings.token))] if settings.token else []
    refusals = serving_api.errors

    def require_name(name: str) -> None:
        if name != follower.name:
            raise RequestError(
                404, f"no model {name!r} here; this service serves {follower.name!r}"
            )

    def served_model() -> ServedModel:
        served = follower.current
        if served is None:
            raise RequestError(
                503,
                f"not ready: {follower.status}",
                {"Retry-After": str(max(1, round(follower.poll_interval_s)))},
            )
        return served

    async def ready() -> Response:
        served = served_model()
        return _json({"ready": True, "name": served.name, "version": served.version})

    @app.get("/health", response_model=serving_api.Health)
    async def health() -> Response:
        return _json({"status": "ok"})

    for probe in ("/ready", "/ping"):
        app.get(probe, response_model=serving_api.Ready, responses=refusals(503))(ready)

    @app.get(
        "/models/{name}",
        dependencies=guarded,
        response_model=serving_api.ModelDescription,
        responses=refusals(404),
    )
    async def model(name: str) -> Response:
        require_name(name)
        served = follower.current
        columns = served.columns if served else None
        schema = {"columns": columns, "type": "number", "max_rows": settings.max_rows}
        return _json(follower.describe() | {"input_schema": schema})

    @app.post(
        "/models/{name}/predictions",
        dependencies=guarded,
        response_model=serving_api.PredictionResponse,
        responses=refusals(400, 404, 413, 415, 422, 503),
    )
    async def predictions(name: str, request: Request) -> Response:
        require_name(name)
        served = served_model()
        if (media_type := _media_type(request)) != "application/json":
            raise RequestError(415, f"send the rows as JSON (application/json), got {media_type}")
        body = await _read_body(request, settings.max_body_bytes)
        values = prediction_rows(body, served.scorer, settings.max_rows)
        records = await batcher.score(served, values)
        payload = {"model": {"name": served.name, "version": served.version}}
        return _json(payload | {"predictions": served.predictions(records)}, served.version)

    @app.post(
        "/invocations",
        dependencies=guarded,
        response_model=serving_api.InvocationResponse,
        responses=refusals(400, 413, 415, 422, 503),
    )
    async def invocations(request: Request) -> Response:
        served = served_model()
        body = await _read_body(request, settings.max_body_bytes)
        values = invocation_rows(body, _media_type(request), served.scorer, settings.max_rows)
        return _json({"predictions": await batcher.score(served, values)}, served.version)

    _add_openapi(app, follower, settings, guarded)
    _add_error_handlers(app)
    if settings.access_log:
        app.add_middleware(AccessLog)
    return app


def serve(tracking: Tracking, settings: ServeSettings, host: str, port: int) -> None:
    """Run the service until interrupted (SIGINT/SIGTERM finish the requests in flight)."""
    import uvicorn

    follower = ModelFollower(tracking, settings.name, settings.alias, settings.poll_interval_s)
    app = create_app(follower, settings)
    log.info(
        "serving models:/%s@%s from %s on http://%s:%d (polling every %gs, %s)",
        settings.name,
        settings.alias,
        tracking.tracking_uri,
        host,
        port,
        settings.poll_interval_s,
        f"bearer token from {TOKEN_VARIABLE} required" if settings.token else "no authentication",
    )
    uvicorn.run(
        app, host=host, port=port, log_config=None, access_log=False, timeout_graceful_shutdown=5
    )


#: Routes that take the bearer token when one is set, as (path, method) of the OpenAPI document.
GUARDED_OPERATIONS = [
    ("/models/{name}", "get"),
    ("/models/{name}/predictions", "post"),
    ("/invocations", "post"),
]


def _add_openapi(
    app: FastAPI, follower: ModelFollower, settings: ServeSettings, guarded: list[Any]
) -> None:
    """``GET /openapi.json`` and ``GET /docs`` (Swagger UI), behind the token when one is set.

    The document names the served version's exact columns and ranges; it is rebuilt when the
    version changes.
    """
    cache: dict[str, Any] = {}

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _generic_document(app, settings)
        served = follower.current
        if served is None:
            return app.openapi_schema
        if cache.get("served") is not served:  # a new version: its columns and ranges
            scorer = served.scorer
            cache["document"] = serving_api.for_model(
                app.openapi_schema,
                served.name,
                served.columns,
                scorer.limits,
                scorer.imputes,
                settings.max_rows,
            )
            cache["served"] = served
        return cache["document"]

    app.openapi = document  # type: ignore[method-assign]

    @app.get("/openapi.json", dependencies=guarded, include_in_schema=False)
    async def openapi() -> Response:
        return _json(document())

    @app.get("/docs", dependencies=guarded, include_in_schema=False)
    async def docs() -> Response:
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url="/openapi.json", title="trackflow - API")


def _generic_document(app: FastAPI, settings: ServeSettings) -> dict[str, Any]:
    """The OpenAPI document of the routes, for any model: request bodies and the token added."""
    from fastapi.openapi.utils import get_openapi

    document = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    serving_api.drop_validation_errors(document)
    serving_api.add_request_bodies(document)
    if settings.token:
        serving_api.add_bearer(document, GUARDED_OPERATIONS)
    return document


async def _warm_routes(app: FastAPI, name: str, token: str | None) -> None:
    """Send one request to each route through the app itself, before the server listens.

    FastAPI does some work on a route's first request (it reads the endpoint's source, for error
    messages: ~1-2 ms here); done now, no client pays it. No model is loaded yet: the scoring
    routes answer 503.
    """
    headers = [(b"content-type", b"application/json")]
    if token:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    routes = [("GET", "/health"), ("GET", "/ready"), ("GET", "/ping"), ("GET", f"/models/{name}")]
    routes += [("POST", f"/models/{name}/predictions"), ("POST", "/invocations")]

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Any) -> None:
        pass

    for method, path in routes:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": None,
            "server": None,
            _WARM_UP: True,
        }
        await app(scope, receive, send)


def _bearer(token: str) -> Any:
    expected = token.encode()

    async def authorize(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise RequestError(
                401,
                "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                {"WWW-Authenticate": "Bearer"},
            )

    return authorize


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError) -> Response:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(InputError)
    async def invalid(request: Request, exc: InputError) -> Response:
        return _error(422, str(exc))

    @app.exception_handler(HTTPException)  # routing: unknown path (404), wrong method (405)
    async def routing(request: Request, exc: HTTPException) -> Response:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return _error(exc.status_code, message, exc.headers)  # 405: Allow

    @app.exception_handler(Exception)  # the traceback goes to the service's log only
    async def crashed(request: Request, exc: Exception) -> Response:
        return _error(500, "internal error while answering; the service's log has the details")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    body = bytearray()
    if not (declared.isdigit() and int(declared) > limit):
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                break
        else:
            return bytes(body)
    raise RequestError(413, f"the body is over this service's limit of {limit} bytes")


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "application/json").split(";")[0].strip().lower()


def _json(payload: Any, version: str | None = None) -> Response:
    headers = {"X-Model-Version": version} if version else None
    return Response(orjson.dumps(payload), headers=headers, media_type="application/json")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    code = ERROR_CODES.get(status, "ERROR")
    return Response(
        orjson.dumps({"error_code": code, "message": message}),
        status,
        headers,
        media_type="application/json",
    )


class AccessLog:
    """ASGI middleware: one log line per request with its status, answering version and time."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Pass the request on; log it once answered."""
        if scope["type"] != "http" or scope.get(_WARM_UP):
            await self.app(scope, receive, send)
            return
        start, answer = time.perf_counter(), {"status": 0, "version": "-"}

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                headers = dict(message.get("headers", []))
                answer["version"] = headers.get(b"x-model-version", b"-").decode()
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            log.info(
                "%s %s %s version=%s %.1f ms",
                scope["method"],
                scope["path"],
                answer["status"],
                answer["version"],
                (time.perf_counter() - start) * 1e3,
            )
