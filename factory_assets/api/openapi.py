"""The twin API's contract and its documentation pages, both usable offline.

``install(app)`` (called by ``create_app``):

* serves Swagger UI at ``/docs`` and ReDoc at ``/redoc`` from assets shipped in the package
  (``docs_assets/``: swagger-ui-dist, Apache-2.0; redoc, MIT; see its README.md), so the pages
  render on a machine without internet, where FastAPI's defaults load them from a CDN;
* replaces ``app.openapi()``: FastAPI's document lists only 200 and 422 (with a body
  ``{"detail": [...]}`` this API never sends). Ours declares, for every operation, each status
  the running server can answer (``ROUTES`` below plus the rules every route shares), with the
  error body ``{"error": code, "message": text}`` as the schema, the headers that go with them
  (``ETag``, ``WWW-Authenticate``, ``Retry-After``) and the bearer-token security schemes,
  so a generated client handles every answer.

Who answers what (keep in step with ``app.py`` and ``web/limits.py``; the tests in
``factory_assets_tests/api/test_openapi.py`` fuzz the real server against this document):

* every operation: 408 (body not complete in time) and 413 (body over the limit) from
  ``RequestLimits``; 503 beyond the server's connection limit (``WebServer``, ``Retry-After``);
* with parameters or a body: 422 (FastAPI's validation, reshaped by the app's handler);
* with a JSON body: 400 ``MalformedJSON``;
* reads with ``auth="read"``: 401 when reads are closed and the token is missing/unknown/revoked;
  writes (``auth="write"``): 401, and 403 for a read-only token;
* with a path parameter: 404 (an unknown factory or frame; also a path the router does not match);
* the rest per route in ``ROUTES``.
"""
# no `from __future__ import annotations`: FastAPI must resolve the docs routes' `Request`
import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).with_name("docs_assets")
ASSETS_URL = "/docs-assets"
DOCS_URL = "/docs"
REDOC_URL = "/redoc"

ERROR = "Error"
INVALID = "InvalidRequest"
CONFLICT = "VersionConflict"
HEALTH = "Health"


@dataclass(frozen=True)
class Route:
    """What one operation may answer beyond the rules every route shares.

    ``auth``: ``"read"`` (a reader token when reads are closed), ``"write"`` or ``None`` (open).
    ``errors``: status -> description (the ``error`` codes it carries); the body is ``Error``
    unless ``schemas`` names another component for that status.
    ``ok``: extra success statuses (e.g. 304) -> description.
    """

    auth: str | None = "read"
    errors: dict[int, str] = field(default_factory=dict)
    ok: dict[int, str] = field(default_factory=dict)
    schemas: dict[int, str] = field(default_factory=dict)
    etag: tuple[int, ...] = ()  # statuses that carry the twin version as ETag
    headers: dict[int, tuple[str, ...]] = field(default_factory=dict)  # other headers a status carries
    media: dict[int, dict] = field(default_factory=dict)  # a success that is not JSON: its whole content
    params: dict[str, dict] = field(default_factory=dict)  # parameter name -> what its schema adds
    # status -> link name -> (method, path of the operation it leads to, its parameters as runtime expressions)
    links: dict[int, dict[str, tuple[str, str, dict[str, str]]]] = field(default_factory=dict)


_FACTORY_404 = "`UnknownFactory`: no such factory (see `GET /api/factories`)"
_FRAME_ID = {"pattern": "^[0-9a-fA-F]{24}$", "description": "a frame id (24 hex digits), e.g. the `id` of "
                                                             "`GET /api/frames/latest`"}
_NO_TWIN = "`UnknownFactory`: no such factory; `NoTwinYet`: the factory has no twin yet"

ROUTES: dict[tuple[str, str], Route] = {
    ("get", "/api/factories"): Route(),
    ("get", "/api/factories/{factory_id}/twin"): Route(
        ok={304: "Not modified: `If-None-Match` names the current version (or `*`); no body"},
        errors={404: _NO_TWIN}, etag=(200, 304)),
    ("get", "/api/factories/{factory_id}/twin/history"): Route(
        errors={400: "`BadParameter`: `since`/`until` is not an ISO-8601 time", 404: _FACTORY_404}),
    ("get", "/api/factories/{factory_id}/twin/events"): Route(
        media={200: {"text/event-stream": {"schema": {"type": "string"}}}},
        errors={400: "`BadVersion`: `Last-Event-ID` is not a twin version", 404: _FACTORY_404}),
    ("patch", "/api/factories/{factory_id}/twin/desired"): Route(
        auth="write",
        errors={400: "`BadVersion`: `If-Match` is not a twin version",
                404: _NO_TWIN,
                412: "`VersionConflict`: the twin is at another version (its current `ETag` and `version` "
                     "come with the answer); read it again and retry",
                422: "`InvalidRequest`: the body is not a desired stock (or names no colour); "
                     "`DesiredInvalid`: a count the factory cannot reach (below the reported one)",
                428: "`PreconditionRequired`: send `If-Match: \"<version>\"` (the `ETag` of GET .../twin)"},
        schemas={412: CONFLICT}, etag=(200, 412)),
    ("post", "/api/factories/{factory_id}/orders"): Route(
        auth="write",
        errors={404: _FACTORY_404,
                409: "`NoStock`: no piece of that type left (the reported stock minus what is on order), "
                     "or the factory has reported no stock yet",
                422: "`InvalidRequest`: the body is not an order (or the `Idempotency-Key` is malformed); "
                     "`IdempotencyKeyReused`: the key placed an order of another type"},
        headers={201: ("Location", "Idempotent-Replayed")},
        links={201: {"order": ("get", "/api/factories/{factory_id}/orders/{order_id}",
                               {"factory_id": "$request.path.factory_id", "order_id": "$response.body#/id"})}}),
    ("get", "/api/factories/{factory_id}/orders"): Route(errors={404: _FACTORY_404}),
    ("get", "/api/factories/{factory_id}/orders/{order_id}"): Route(
        errors={404: "`UnknownFactory`: no such factory; `NoOrder`: the factory has no such order"}),
    ("get", "/api/frames/latest"): Route(
        errors={404: "`NoFrame`: no frame from that factory yet"},
        links={200: {"image": ("get", "/api/frames/{frame_id}.jpg", {"frame_id": "$response.body#/id"}),
                     "evidence": ("get", "/api/frames/{frame_id}/evidence", {"frame_id": "$response.body#/id"})}}),
    ("get", "/api/frames/{frame_id}.jpg"): Route(
        media={200: {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}},
        params={"frame_id": _FRAME_ID},
        errors={400: "`BadFrameId`: not a frame id (24 hex digits)", 404: "`NoFrame`: no such frame"}),
    ("get", "/api/frames/{frame_id}/evidence"): Route(
        params={"frame_id": _FRAME_ID},
        errors={400: "`BadFrameId`: not a frame id (24 hex digits)", 404: "`NoFrame`: no such frame",
                422: "`UndecodableFrame`: the frame's image cannot be decoded"}),
    ("get", "/api/fleet"): Route(),
    ("get", "/api/health"): Route(
        auth=None, errors={503: "`degraded`: the twin reader stopped or fails every read (MongoDB down); "
                                "the body is the health report (or, when the server is overloaded, "
                                "an `Error` `ServiceUnavailable` with `Retry-After`)"},
        schemas={200: HEALTH, 503: HEALTH}),
}

# -- the shared rules --------------------------------------------------------------------------
_COMMON = {
    408: "`RequestTimeout`: the request body did not arrive in time; the connection is closed",
    413: "`PayloadTooLarge`: the request body is over the server's limit (16 KiB by default)",
    503: "`ServiceUnavailable`: too many connections or requests at once; retry after `Retry-After` seconds",
}
_VALIDATION = "`InvalidRequest`: a parameter or the body does not match this document (`details` says where)"
_MALFORMED = "`MalformedJSON`: the request body is not valid JSON"
_UNAUTHORIZED = ("`Unauthorized`: no, an unknown or a revoked bearer token (reads need one only when "
                 "the server does not leave them open); create one with `factory-assets api token create NAME`")
_FORBIDDEN = "`Forbidden`: the token may only read"
_PATH_404 = "`NotFound`: the path matches no route (e.g. a parameter holding `/`)"

_FASTAPI_DEFAULTS = ("Successful Response", "Validation Error", "Additional Response")

COMPONENTS = {
    ERROR: {
        "title": "Error",
        "description": "Every error: a stable code and a sentence for a person. The request changed nothing.",
        "type": "object",
        "required": ["error", "message"],
        "properties": {
            "error": {"type": "string", "description": "a stable code, e.g. `UnknownFactory`",
                      "examples": ["UnknownFactory"]},
            "message": {"type": "string", "description": "what went wrong and what to do",
                        "examples": ["no factory 'factory-9'; see GET /api/factories"]},
        },
    },
    INVALID: {
        "title": "InvalidRequest",
        "description": "A request that does not match this document; `details` lists where (up to 20).",
        "allOf": [{"$ref": f"#/components/schemas/{ERROR}"}],
        "type": "object",
        "properties": {
            "details": {"type": "array", "items": {
                "type": "object", "required": ["loc", "msg", "type"],
                "properties": {"loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                               "msg": {"type": "string"}, "type": {"type": "string"}}}},
        },
    },
    CONFLICT: {
        "title": "VersionConflict",
        "description": "`If-Match` named another version than the twin's: `version` is the current one.",
        "allOf": [{"$ref": f"#/components/schemas/{ERROR}"}],
        "type": "object",
        "required": ["version"],
        "properties": {"version": {"type": ["integer", "null"]}},
    },
    HEALTH: {
        "title": "Health",
        "type": "object",
        "required": ["status", "reader"],
        "properties": {
            "status": {"type": "string", "enum": ["ok", "degraded"]},
            "reader": {"type": "string", "description": "`change_stream` or `poll`; `failing`; `stopped`"},
            "subscribers": {"type": "integer"}, "events": {"type": "integer"},
            "reader_errors": {"type": "integer"}, "failing_reads": {"type": "integer"},
            "bad_documents": {"type": "integer"}, "reads_open": {"type": "boolean"},
        },
    },
}

SECURITY_SCHEMES = {
    "bearerToken": {"type": "http", "scheme": "bearer",
                    "description": "A token from `factory-assets api token create NAME [--scope read|write]` "
                                   "(`fa_…`, shown once)."},
    "tokenQuery": {"type": "apiKey", "in": "query", "name": "token",
                   "description": "The same token as `?token=`, for clients that cannot set headers "
                                  "(EventSource, Unity WebGL)."},
}

_HEADERS = {
    "ETag": {"description": "the twin's version, quoted: send it back as `If-Match` / `If-None-Match`",
             "schema": {"type": "string", "pattern": r'^(W/)?"\d+"$'}},
    "WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}},
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}},
    "Location": {"description": "the order's own URL", "schema": {"type": "string"}},
    "Idempotent-Replayed": {"description": "`true` when this answers a retry: the order the first request placed",
                            "schema": {"type": "string", "enum": ["true"]}},
}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def declared_errors(path: str, operation: dict, route: Route) -> dict[int, tuple[str, str | None]]:
    """status -> (description, schema component) for every error the operation may answer."""
    out: dict[int, tuple[str, str | None]] = {s: (d, ERROR) for s, d in _COMMON.items()}
    if operation.get("parameters") or operation.get("requestBody"):
        out[422] = (_VALIDATION, INVALID)
    if operation.get("requestBody"):
        out[400] = (_MALFORMED, ERROR)
    if route.auth in ("read", "write"):
        out[401] = (_UNAUTHORIZED, ERROR)
    if route.auth == "write":
        out[403] = (_FORBIDDEN, ERROR)
    if "{" in path:
        out[404] = (_PATH_404, ERROR)
    for status, text in route.errors.items():
        if status == 404 and status in out:  # the route's meaning, and the router's
            text = f"{text}; {out[status][0]}"
        out[status] = (text, route.schemas.get(status, INVALID if status == 422 else ERROR))
    return out


def complete(doc: dict) -> dict:
    """Complete FastAPI's document (in place): every status each operation answers, its body and headers."""
    components = doc.setdefault("components", {})
    components.setdefault("schemas", {}).update(copy.deepcopy(COMPONENTS))
    components["securitySchemes"] = copy.deepcopy(SECURITY_SCHEMES)
    undeclared = []
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            if method not in ("get", "put", "post", "patch", "delete", "head", "options"):
                continue
            route = ROUTES.get((method, path))
            if route is None:
                undeclared.append(f"{method.upper()} {path}")
                route = Route()  # the shared rules at least
            _complete(path, op, route)
            _link(doc, op, route)
    if undeclared:
        # the tests fail on this (every operation is in ROUTES); a running server still serves
        logger.warning("OpenAPI: no entry in factory_assets.api.openapi.ROUTES for %s: only the shared "
                       "error statuses are declared", ", ".join(undeclared))
    _drop_unused(doc)
    return doc


def _complete(path: str, op: dict, route: Route) -> None:
    from factory_assets.api.app import DEFAULT_FACTORY

    responses = op.setdefault("responses", {})
    for status, text in route.ok.items():
        responses.setdefault(str(status), {})["description"] = text
    for status, (text, schema) in sorted(declared_errors(path, op, route).items()):
        resp = responses.setdefault(str(status), {})
        own = resp.get("description")
        if status not in route.errors and own and own not in _FASTAPI_DEFAULTS:
            text = f"{own}; {text}"  # what the route itself says (responses=), then the shared meaning
        resp["description"] = text
        if status == 503 and schema == HEALTH:
            resp["content"] = _json({"anyOf": [_ref(HEALTH), _ref(ERROR)]})
        else:
            resp["content"] = _json(_ref(schema))
        headers = {}
        if status == 401:
            headers["WWW-Authenticate"] = _HEADERS["WWW-Authenticate"]
        if status == 503:
            headers["Retry-After"] = _HEADERS["Retry-After"]
        if status in route.etag:
            headers["ETag"] = _HEADERS["ETag"]
        if headers:
            resp["headers"] = headers
    for status in route.etag:
        if str(status) in responses:
            responses[str(status)].setdefault("headers", {})["ETag"] = _HEADERS["ETag"]
    for status, names in route.headers.items():
        if str(status) in responses:
            responses[str(status)].setdefault("headers", {}).update({n: _HEADERS[n] for n in names})
    for param in op.get("parameters", []):
        if param["name"] in route.params:
            param.setdefault("schema", {}).update(route.params[param["name"]])
            param["description"] = route.params[param["name"]].get("description", param.get("description"))
        if param["name"] in ("factory_id", "factory") and "example" not in param:
            param["example"] = DEFAULT_FACTORY  # Swagger UI's "Try it out" starts from the simulated factory
    for status, content in route.media.items():
        responses.setdefault(str(status), {"description": "OK"})["content"] = copy.deepcopy(content)
    for status, schema in route.schemas.items():
        if status < 400 and str(status) in responses:
            responses[str(status)]["content"] = _json(_ref(schema))
    if route.auth == "read":
        op["security"] = [{}, {"bearerToken": []}, {"tokenQuery": []}]  # {}: open when reads are open
    elif route.auth == "write":
        op["security"] = [{"bearerToken": []}, {"tokenQuery": []}]
    op["responses"] = dict(sorted(responses.items()))


def _link(doc: dict, op: dict, route: Route) -> None:
    """OpenAPI links: where an answer's ids lead (generated clients, Swagger UI, the fuzzer's stateful phase)."""
    for status, links in route.links.items():
        resp = op["responses"].get(str(status))
        if resp is None:
            continue
        for name, (method, path, parameters) in links.items():
            target = doc["paths"].get(path, {}).get(method)
            if target is not None:
                resp.setdefault("links", {})[name] = {"operationId": target["operationId"], "parameters": parameters}


def _drop_unused(doc: dict) -> None:
    """FastAPI's own validation-error schemas, when nothing refers to them any more."""
    import json

    schemas = doc.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        if name in schemas:
            rest = {k: v for k, v in doc.items() if k != "components"}
            others = {k: v for k, v in schemas.items() if k != name}
            if f"#/components/schemas/{name}\"" not in json.dumps([rest, others]):
                del schemas[name]


def install(app) -> None:
    """Offline ``/docs`` and ``/redoc`` (the app is built with ``docs_url=None, redoc_url=None``)
    and the completed OpenAPI document at ``app.openapi_url``."""
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles
    from starlette.requests import Request

    if app.docs_url or app.redoc_url:
        raise ValueError("build the app with docs_url=None, redoc_url=None: install() serves them offline")

    fastapi_document = app.openapi  # FastAPI's own (it caches it in app.openapi_schema)

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = complete(fastapi_document())
        return app.openapi_schema

    app.openapi = openapi
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")

    @app.get(DOCS_URL, include_in_schema=False)
    def swagger_ui(request: Request):
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=root + app.openapi_url, title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=None,  # no OAuth2 here: bearer tokens from the CLI
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            # no validator badge: it would send the document to validator.swagger.io
            swagger_ui_parameters={"validatorUrl": None, **(app.swagger_ui_parameters or {})})

    @app.get(REDOC_URL, include_in_schema=False)
    def redoc(request: Request):
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=root + app.openapi_url, title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png", with_google_fonts=False)
