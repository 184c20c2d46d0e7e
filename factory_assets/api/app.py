"""The twin API (FastAPI on the shared uvicorn stack) and the live page at ``/``.

Routes (OpenAPI at ``/docs`` and ``/openapi.json``):

* ``GET  /api/factories``, ``GET /api/factories/{id}/twin`` (``ETag`` = version, ``If-None-Match`` -> 304)
* ``GET  /api/factories/{id}/twin/history?since=&until=&limit=&cursor=``
* ``GET  /api/factories/{id}/twin/events`` (SSE, ``Last-Event-ID`` resume) and ``WS .../twin/ws``
* ``POST /api/factories/{id}/orders`` ``{"type": "RED"}`` (ship one piece; ``Idempotency-Key``),
  ``GET /api/factories/{id}/orders``, ``GET /api/factories/{id}/orders/{order_id}``
* ``PATCH /api/factories/{id}/twin/desired`` (``If-Match`` required: 428 without, 412 on conflict;
  a count below the reported one ships the difference)
* ``GET /api/frames/latest?factory=``, ``GET /api/frames/{id}.jpg``, ``GET /api/frames/{id}/evidence``
* ``GET /api/fleet``: every factory at a glance (the page ``/fleet``; ``api/fleet.py``)

Every error is ``{"error": code, "message": text}`` with a 4xx/5xx status and changes nothing.
"""

# no `from __future__ import annotations`: FastAPI must resolve the routes' locally defined types
import asyncio
import json
import logging
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Literal

from factory_assets.twin.orders import OrderRules
from factory_assets.vocabulary import ORDER_TOPIC, utcnow

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
FACTORY_ID = r"^[A-Za-z0-9._-]{1,64}$"
DEFAULT_FACTORY = "factory-1"


@dataclass
class ApiSettings:
    open_reads: bool | None = None  # None: open when bound to a loopback address
    host: str = "127.0.0.1"
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 16 * 1024
    body_timeout: float = 10.0
    keepalive: float = 15.0
    mqtt_url: str | None = None  # orders go out through this broker (mqtt[s]://[user[:password]@]host:port)
    mqtt_ca_file: str | None = None
    mqtt_cert_file: str | None = None
    mqtt_key_file: str | None = None
    mqtt_prefixes: tuple[str, ...] = ()  # "PREFIX=FACTORY_ID": a factory's orders go out under its prefix
    order_topic: str = ORDER_TOPIC
    change_streams: bool = True
    poll_interval: float = 0.1
    hub_ready_timeout: float = 10.0  # startup waits (at most this) for the twin reader's first read
    order_interval: float = 1.0  # the order dispatcher's pass interval (it also runs when kicked)
    order_rules: OrderRules = field(default_factory=OrderRules)
    default_factories: tuple[str, ...] = (DEFAULT_FACTORY,)
    extra: dict = field(default_factory=dict)

    @property
    def reads_open(self) -> bool:
        if self.open_reads is not None:
            return self.open_reads
        return self.host in ("127.0.0.1", "localhost", "::1")

    def mqtt_target(self):
        """The broker orders go out through (login and TLS as ``MqttTarget.parse`` reads them), or None."""
        from factory_assets.vocabulary.mqtt import MqttTarget

        if not self.mqtt_url:
            return None
        return MqttTarget.parse(self.mqtt_url, ca_file=self.mqtt_ca_file, cert_file=self.mqtt_cert_file,
                                key_file=self.mqtt_key_file)

    def topic_prefixes(self) -> tuple:
        from factory_assets.vocabulary.mqtt import TopicPrefix

        return tuple(TopicPrefix.parse(p) for p in self.mqtt_prefixes)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}
        self.extra = extra or {}


def _etag(version: int) -> str:
    return f'"{version}"'


def _parse_version(value: str, header: str) -> int:
    v = value.strip()
    if v.startswith("W/"):
        v = v[2:]
    v = v.strip('"')
    if not re.fullmatch(r"\d{1,18}", v):
        raise ApiError(400, "BadVersion", f"{header} must be a twin version (e.g. \"12\"), got {value[:40]!r}")
    return int(v)


def _parse_time(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, "BadParameter", f"{name} must be an ISO-8601 time, got {value[:40]!r}") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def create_app(fdb, settings: ApiSettings | None = None):
    """The FastAPI app (``app.state.hub`` is the process's one twin reader)."""
    from bson import ObjectId
    from fastapi import Depends, FastAPI, Header, Path as PathParam, Query, Request, WebSocket
    from fastapi.exceptions import RequestValidationError
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.websockets import WebSocketDisconnect

    from factory_assets.api import tokens as tok
    from factory_assets.api.hub import TwinHub, follow, history_json, history_page, to_json, twin_json
    from factory_assets.api.orders import MqttOrderLink, OrderDispatcher
    from factory_assets.twin import desired as des
    from factory_assets.twin import orders as tw

    settings = settings or ApiSettings()
    des.ensure_indexes(fdb)
    tok.ensure_indexes(fdb)
    target = settings.mqtt_target()
    link = (MqttOrderLink(target, prefixes=settings.topic_prefixes(), default_factory=settings.default_factories[0],
                          order_topic=settings.order_topic) if target is not None else None)
    dispatcher = (OrderDispatcher(fdb, link, settings.order_rules, interval=settings.order_interval)
                  if link is not None else None)

    hub = TwinHub(fdb, poll_interval=settings.poll_interval, change_streams=settings.change_streams)

    @asynccontextmanager
    async def lifespan(app):
        hub.start(asyncio.get_running_loop())
        sweeper = None
        if dispatcher is not None:
            link.start()
            sweeper = asyncio.create_task(dispatcher.run(), name="order-dispatcher")
        else:
            logger.warning("orders: no --mqtt broker; orders are stored as queued and sent once an API "
                           "process with a broker runs")
        try:
            # No request before the hub's first read of the twins: a client's catch-up read made
            # earlier could miss a change landing before that read (the hub takes it as seen).
            if not await hub.wait_ready(settings.hub_ready_timeout):
                logger.warning("twin hub: no first read of the twins within %.0f s (MongoDB unavailable?); "
                               "serving anyway, streams wait for it", settings.hub_ready_timeout)
            yield
        finally:
            if sweeper is not None:
                sweeper.cancel()
                await asyncio.gather(sweeper, return_exceptions=True)
                await asyncio.to_thread(dispatcher.release)
            hub.close()
            if link is not None:
                link.stop()

    app = FastAPI(title="factory_assets twin API", version="1", lifespan=lifespan,
                  docs_url=None, redoc_url=None,  # served offline by api.openapi.install
                  description="The digital twin of the Fischertechnik warehouse: state, history, "
                              "live events (SSE, WebSocket), orders that ship a piece out, desired stock.")
    app.state.hub = hub
    app.state.settings = settings
    app.state.dispatcher = dispatcher
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "PATCH", "POST"],
                           allow_headers=["Authorization", "If-Match", "If-None-Match", "Content-Type",
                                          "Last-Event-ID", "Idempotency-Key"],
                           expose_headers=["ETag", "Location", "Idempotent-Replayed"])

    # -- errors: always {"error", "message"} -----------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse({"error": exc.code, "message": exc.message, **exc.extra}, exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        code = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        return JSONResponse({"error": code, "message": str(exc.detail)}, exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse({"error": "MalformedJSON", "message": "the request body is not valid JSON"}, 400)
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in errors[:5]]
        return JSONResponse({"error": "InvalidRequest", "message": "; ".join(parts),
                             "details": [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
                                         for e in errors[:20]]}, 422)

    # -- auth ---------------------------------------------------------------------------------
    def _token(request_headers, query) -> str | None:
        auth = request_headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return query.get("token") or query.get("access_token")

    def _check(token: str | None, write: bool) -> None:
        if not write and settings.reads_open:
            return
        info = tok.check_token(fdb, token)
        if info is None or info.revoked:
            what = "a revoked" if info else ("an unknown" if token else "no")
            raise ApiError(401, "Unauthorized", f"{what} bearer token; create one with "
                                                 "`factory-assets api token create NAME`",
                           headers={"WWW-Authenticate": "Bearer"})
        if write and info.scope != "write":
            raise ApiError(403, "Forbidden", f"token {info.name!r} may only read")

    def reader(request: Request) -> None:
        _check(_token(request.headers, request.query_params), write=False)

    def writer(request: Request) -> None:
        _check(_token(request.headers, request.query_params), write=True)

    def known_factory(factory_id: str) -> dict | None:
        doc = fdb.twin.find_one({"_id": factory_id})
        if doc is None and factory_id not in settings.default_factories:
            raise ApiError(404, "UnknownFactory", f"no factory {factory_id!r}; see GET /api/factories")
        return doc

    FactoryId = Annotated[str, PathParam(pattern=FACTORY_ID, description="factory id, e.g. factory-1")]

    # -- the page -------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # -- the fleet: every factory at a glance (api/fleet.py) -------------------------------------
    from factory_assets.api.fleet import FleetView

    fleet = FleetView(fdb, default_factories=settings.default_factories)

    @app.get("/fleet", include_in_schema=False)
    def fleet_page():
        return FileResponse(STATIC_DIR / "fleet.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/fleet", dependencies=[Depends(reader)])
    def fleet_summary():
        """Every factory: twin version and age, model, vision/controller agreement over the last hour,
        newest frame and its age, station faults, orders in progress, clock (docs/fleet.md)."""
        return fleet.summary()

    # -- twin -----------------------------------------------------------------------------------
    @app.get("/api/factories", dependencies=[Depends(reader)])
    def factories():
        docs = {d["_id"]: d for d in fdb.twin.find({}, {"version": 1, "updated_at": 1})}
        ids = sorted(set(docs) | set(settings.default_factories))
        return {"factories": [{"id": i, "version": (docs.get(i) or {}).get("version"),
                               "updated_at": to_json((docs.get(i) or {}).get("updated_at"))} for i in ids]}

    @app.get("/api/factories/{factory_id}/twin", dependencies=[Depends(reader)])
    def get_twin(factory_id: FactoryId, if_none_match: Annotated[str | None, Header()] = None):
        doc = known_factory(factory_id)
        if doc is None:
            raise ApiError(404, "NoTwinYet", f"factory {factory_id!r} has no twin yet")
        etag = _etag(doc.get("version", 0))
        if if_none_match is not None:
            tags = [t.strip() for t in if_none_match.split(",")]
            if "*" in tags or etag in tags or f"W/{etag}" in tags:
                return Response(status_code=304, headers={"ETag": etag})
        return JSONResponse(twin_json(doc), headers={"ETag": etag, "Cache-Control": "no-cache"})

    @app.get("/api/factories/{factory_id}/twin/history", dependencies=[Depends(reader)])
    def history(factory_id: FactoryId, since: str | None = None, until: str | None = None,
                limit: Annotated[int, Query(ge=1, le=500)] = 50,
                cursor: Annotated[str | None, Query(pattern=r"^\d{1,18}$",
                                                    description="next_cursor of the previous page")] = None,
                order: Literal["asc", "desc"] = "desc"):
        twin = known_factory(factory_id)
        t0, t1 = _parse_time(since, "since"), _parse_time(until, "until")
        # version ranges of this factory next to the page (index factory_version), never its whole history
        top = (twin or {}).get("version")
        rows, more = history_page(fdb, factory_id, top if isinstance(top, int) else 0, limit=limit,
                                  cursor=None if cursor is None else int(cursor), order=order, since=t0, until=t1)
        return {"factory_id": factory_id, "items": [history_json(r) for r in rows],
                "next_cursor": str(rows[-1]["version"]) if more and rows else None}

    def _last_id(value: str | None) -> int | None:
        if value is None or value == "":
            return None
        return _parse_version(value, "Last-Event-ID")

    @app.get("/api/factories/{factory_id}/twin/events", dependencies=[Depends(reader)],
             response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "events `snapshot`, `change`, `update`; id = twin version"}})
    def events(factory_id: FactoryId, last_event_id: Annotated[str | None, Header()] = None,
               last_event_id_q: Annotated[str | None, Query(alias="last_event_id")] = None):
        known_factory(factory_id)
        last = _last_id(last_event_id if last_event_id is not None else last_event_id_q)

        async def stream():
            yield b"retry: 2000\n\n"
            async for msg in follow(hub, fdb, factory_id, last, keepalive=settings.keepalive):
                if msg is None:
                    yield b": keep-alive\n\n"
                    continue
                data = json.dumps(msg, separators=(",", ":"))
                if "version" not in msg:  # a camera frame: no id, so Last-Event-ID stays the twin version
                    yield f"event: {msg['type']}\ndata: {data}\n\n".encode()
                else:
                    yield f"id: {msg['version']}\nevent: {msg['type']}\ndata: {data}\n\n".encode()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.websocket("/api/factories/{factory_id}/twin/ws")
    async def twin_ws(websocket: WebSocket, factory_id: str):
        # Unity WebGL cannot set headers: the token may come as ?token=; resume with ?since=VERSION
        try:
            if not re.fullmatch(FACTORY_ID, factory_id):
                raise ApiError(400, "BadFactoryId", "factory id must match " + FACTORY_ID)
            await asyncio.to_thread(_check, _token(websocket.headers, websocket.query_params), False)
            await asyncio.to_thread(known_factory, factory_id)
            since = _last_id(websocket.query_params.get("since"))
        except ApiError as exc:
            await websocket.accept()
            await websocket.send_json({"type": "error", "error": exc.code, "message": exc.message})
            await websocket.close(code=4000 + exc.status)
            return
        await websocket.accept()

        async def drain():  # notice a client that closes (we never read its messages)
            while (await websocket.receive())["type"] != "websocket.disconnect":
                pass

        watcher = asyncio.create_task(drain())
        try:
            async for msg in follow(hub, fdb, factory_id, since, keepalive=settings.keepalive):
                if watcher.done():
                    break
                await websocket.send_json(msg if msg is not None else {"type": "keep-alive"})
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            watcher.cancel()

    class DesiredPatch(BaseModel):
        """The desired stock: counts per colour to leave in the rack (absent colours keep their
        desired value). A count below what the controller reports (minus what is on order) ships
        the difference; above the reported count is refused: stock is added at the input station."""

        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"stock": {"red": 1}}]})
        stock: dict[Literal["blue", "red", "white"], Annotated[int, Field(ge=0, le=9, strict=True)]]

    def _kick() -> None:
        if dispatcher is not None:
            dispatcher.kick()

    def _order_json(doc: dict, events: bool = False) -> dict:
        return to_json(tw.order_json_fields(doc, events=events))

    @app.patch("/api/factories/{factory_id}/twin/desired", dependencies=[Depends(writer)],
               responses={412: {"description": "version conflict"}, 428: {"description": "If-Match missing"},
                          422: {"description": "a count above the reported one (stock is added at the input "
                                               "station), or above what orders on their way leave"}})
    def patch_desired(factory_id: FactoryId, body: DesiredPatch,
                      if_match: Annotated[str | None, Header()] = None):
        if known_factory(factory_id) is None:
            raise ApiError(404, "NoTwinYet", f"factory {factory_id!r} has no twin yet")
        if if_match is None:
            raise ApiError(428, "PreconditionRequired",
                           "send If-Match: <twin version> (the ETag of GET .../twin)")
        expected = _parse_version(if_match, "If-Match")
        if not body.stock:
            raise ApiError(422, "InvalidRequest", "stock: name at least one colour")
        try:
            doc, created = des.set_desired(fdb, factory_id, dict(body.stock), expected)
        except des.VersionConflict as exc:
            raise ApiError(412, "VersionConflict", f"the twin is at version {exc.current}, not {expected}",
                           headers={"ETag": _etag(exc.current or 0)}, extra={"version": exc.current}) from None
        except des.DesiredInvalid as exc:
            raise ApiError(422, "DesiredInvalid", str(exc)) from None
        if created:
            _kick()
        return JSONResponse({"twin": twin_json(doc), "orders": [_order_json(o) for o in created]},
                            status_code=200, headers={"ETag": _etag(doc["version"])})

    class OrderRequest(BaseModel):
        """Ship one workpiece of this type out of the warehouse (the controller's own order)."""

        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"type": "RED"}]})
        type: Literal["BLUE", "RED", "WHITE"]

    IDEMPOTENCY_KEY = r"^[\x21-\x7e]{1,255}$"

    @app.post("/api/factories/{factory_id}/orders", dependencies=[Depends(writer)], status_code=201,
              responses={201: {"description": "the order (queued); a retry with the same Idempotency-Key "
                                              "returns the same order (header Idempotent-Replayed: true)"},
                         409: {"description": "no piece of that colour left: the reported stock minus what "
                                              "is already on order"},
                         422: {"description": "a bad body, or an Idempotency-Key used for another type"}})
    def place_order(factory_id: FactoryId, body: OrderRequest,
                    idempotency_key: Annotated[str | None, Header(
                        pattern=IDEMPOTENCY_KEY,
                        description="any unique string (a UUID): a retried request returns the order "
                                    "the first one placed instead of placing another")] = None):
        if known_factory(factory_id) is None:
            raise ApiError(409, "NoStock", f"factory {factory_id!r} has reported no stock yet: nothing to ship")
        try:
            _, placed, replayed = tw.place_orders(fdb, factory_id, [body.type], key=idempotency_key)
        except tw.UnknownFactory:
            raise ApiError(409, "NoStock", f"factory {factory_id!r} has reported no stock yet: nothing to ship") \
                from None
        except tw.NoStock as exc:
            raise ApiError(409, "NoStock", str(exc)) from None
        except tw.IdempotencyConflict as exc:
            raise ApiError(422, "IdempotencyKeyReused", str(exc)) from None
        (order,) = placed
        if not replayed:
            _kick()
        headers = {"Location": f"/api/factories/{factory_id}/orders/{order['_id']}"}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        return JSONResponse(_order_json(order), status_code=201, headers=headers)

    @app.get("/api/factories/{factory_id}/orders", dependencies=[Depends(reader)])
    def list_orders(factory_id: FactoryId, limit: Annotated[int, Query(ge=1, le=200)] = 20):
        twin = known_factory(factory_id)
        state = fdb.db[tw.DISPATCH_COLLECTION].find_one({"_id": factory_id}) or {}
        ready, why = tw.factory_ready(state, settings.order_rules, utcnow())
        return {"items": [_order_json(o) for o in tw.list_orders(fdb, factory_id, limit)],
                "stock": {"reported": tw.reported_counts(twin), "on_order": tw.on_order_counts(twin),
                          "available": tw.available_counts(twin)},
                "factory": to_json({"order_state": state.get("factory_order"), "warehouse": state.get("hbw"),
                                    "ready": ready, "waiting_for": why, "current": state.get("current")}),
                "sending": dispatcher is not None}

    @app.get("/api/factories/{factory_id}/orders/{order_id}", dependencies=[Depends(reader)])
    def get_order(factory_id: FactoryId, order_id: Annotated[str, PathParam(max_length=200)]):
        known_factory(factory_id)
        doc = tw.get_order(fdb, factory_id, order_id)
        if doc is None:
            raise ApiError(404, "NoOrder", f"factory {factory_id!r} has no order {order_id!r}")
        return _order_json(doc, events=True)

    # -- frames ------------------------------------------------------------------------------------
    FRAME_FIELDS = {"image": 0, "data": 0}

    def _frame_id(value: str) -> ObjectId:
        if not ObjectId.is_valid(value):
            raise ApiError(400, "BadFrameId", f"{value[:40]!r} is not a frame id (24 hex digits)")
        return ObjectId(value)

    @app.get("/api/frames/latest", dependencies=[Depends(reader)])
    def latest_frame(factory: Annotated[str, Query(pattern=FACTORY_ID)] = DEFAULT_FACTORY):
        from factory_assets.storage.frames import latest_frame as newest_frame

        doc = newest_frame(fdb, FRAME_FIELDS, factory_id=factory, by="seq")  # a bounded seq window
        if doc is None:
            raise ApiError(404, "NoFrame", f"no frame from factory {factory!r} yet")
        out = to_json(doc)
        out["id"] = out.pop("_id")
        out["url"] = f"/api/frames/{out['id']}.jpg"
        return out

    @app.get("/api/frames/{frame_id}.jpg", dependencies=[Depends(reader)],
             responses={200: {"content": {"image/jpeg": {}}}})
    def frame_image(frame_id: str):
        from factory_assets.storage.frames import frame_image_bytes

        doc = fdb.frames.find_one({"_id": _frame_id(frame_id)}, {"image": 1, "data": 1, "content_type": 1})
        if doc is None:
            raise ApiError(404, "NoFrame", f"no frame {frame_id}")
        return Response(frame_image_bytes(doc), media_type=doc.get("content_type") or "image/jpeg",
                        headers={"Cache-Control": "public, max-age=31536000, immutable"})

    evidence_cache: dict[str, dict] = {}

    @app.get("/api/frames/{frame_id}/evidence", dependencies=[Depends(reader)])
    def frame_evidence(frame_id: str):
        """Where the frame shows each colour: the local model's colour-evidence maps, pooled to a 20x15 grid."""
        from factory_assets.storage.frames import frame_image_bytes

        if frame_id in evidence_cache:
            return evidence_cache[frame_id]
        doc = fdb.frames.find_one({"_id": _frame_id(frame_id)}, {"image": 1, "data": 1})
        if doc is None:
            raise ApiError(404, "NoFrame", f"no frame {frame_id}")
        result = _evidence(frame_image_bytes(doc))
        if len(evidence_cache) > 256:
            evidence_cache.clear()
        evidence_cache[frame_id] = result
        return result

    @app.get("/api/health")
    def health():
        alive, healthy = hub.alive(), hub.healthy()
        body = {"status": "ok" if healthy else "degraded",
                "reader": (hub.stats.mode if healthy else "failing") if alive else "stopped",
                "subscribers": hub.stats.subscribers, "events": hub.stats.events,
                "reader_errors": hub.stats.errors, "failing_reads": hub.stats.failing,
                "bad_documents": hub.stats.bad_documents, "reads_open": settings.reads_open}
        return body if healthy else JSONResponse(body, status_code=503)

    from factory_assets.api import openapi
    openapi.install(app)  # /docs and /redoc offline; every status each route answers in /openapi.json
    return app


def _evidence(image: bytes) -> dict:
    import cv2
    import numpy as np

    from factory_assets.vision.features import WORK_SIZE, FeatureConfig, evidence_maps

    img = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        from factory_assets.api.app import ApiError

        raise ApiError(422, "UndecodableFrame", "the frame's image cannot be decoded")
    small = cv2.resize(img, WORK_SIZE, interpolation=cv2.INTER_AREA)
    maps = evidence_maps(small, FeatureConfig())  # (120, 160, 3): blue, red, white
    cell = 8
    h, w = maps.shape[0] // cell, maps.shape[1] // cell
    pooled = maps[: h * cell, : w * cell].reshape(h, cell, w, cell, 3).mean(axis=(1, 3))
    return {"width": w, "height": h, "colours": {c: np.round(pooled[..., i], 2).tolist()
                                                 for i, c in enumerate(("blue", "red", "white"))}}


def build_asgi(app, settings: ApiSettings):
    """The app behind the shared request bounds (413 over the size limit, 408 on a stalled body)."""
    from factory_assets.web import RequestLimits

    return RequestLimits(app, max_body_bytes=settings.max_body_bytes, body_timeout=settings.body_timeout)


class TwinApiServer:
    """The API on the shared ``WebServer`` (background thread): tests, benchmarks, embedding."""

    def __init__(self, fdb, settings: ApiSettings | None = None, port: int = 0):
        from factory_assets.web import ServerLimits, WebServer

        self.settings = settings or ApiSettings()
        self.app = create_app(fdb, self.settings)
        self.web = WebServer(build_asgi(self.app, self.settings), self.settings.host, port,
                             limits=ServerLimits(limit_concurrency=2048, timeout_graceful_shutdown=3, backlog=512))

    @property
    def hub(self):
        return self.app.state.hub

    @property
    def url(self) -> str:
        return self.web.url

    def start(self) -> "TwinApiServer":
        # returns once the server accepts connections: after the lifespan startup, which waits
        # (at most ``hub_ready_timeout``) for the twin hub's first read
        self.web.start()
        return self

    def stop(self) -> None:
        self.hub.close()  # ends every live stream, so the server drains at once
        self.web.stop()

    def __enter__(self) -> "TwinApiServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
