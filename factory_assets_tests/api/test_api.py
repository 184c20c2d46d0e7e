"""The twin API over real HTTP against the embedded MongoDB."""
from __future__ import annotations

import socket

import httpx
import pytest

from factory_assets_tests.api.conftest import report


def test_twin_answers_with_its_version_as_etag_and_304_when_unchanged(api, fdb):
    r = httpx.get(f"{api.url}/api/factories/factory-1/twin")
    assert r.status_code == 200 and r.headers["etag"] == '"1"'
    body = r.json()
    assert body["factory_id"] == "factory-1" and body["version"] == 1
    assert set(body) >= {"observed", "reported", "delta", "desired", "version", "metadata"} - {"observed"}
    assert httpx.get(f"{api.url}/api/factories/factory-1/twin", headers={"If-None-Match": '"1"'}).status_code == 304
    report(fdb, 1)
    r = httpx.get(f"{api.url}/api/factories/factory-1/twin", headers={"If-None-Match": '"1"'})
    assert r.status_code == 200 and r.headers["etag"] == '"2"'


def test_factories_lists_the_simulated_factory_and_every_twin(api, fdb):
    report(fdb, 0, factory_id="line-2")
    ids = [f["id"] for f in httpx.get(f"{api.url}/api/factories").json()["factories"]]
    assert ids == ["factory-1", "line-2"]


def test_history_pages_through_every_change_once(api, fdb):
    for k in range(1, 12):
        report(fdb, k)
    seen, cursor = [], None
    while True:
        params = {"limit": 5, **({"cursor": cursor} if cursor else {})}
        page = httpx.get(f"{api.url}/api/factories/factory-1/twin/history", params=params).json()
        seen += [item["version"] for item in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(range(12, 0, -1))
    asc = httpx.get(f"{api.url}/api/factories/factory-1/twin/history", params={"order": "asc", "limit": 3}).json()
    assert [i["version"] for i in asc["items"]] == [1, 2, 3] and asc["next_cursor"] == "3"


def test_desired_needs_if_match_and_refuses_a_stale_version(api, fdb, write_token):
    url = f"{api.url}/api/factories/factory-1/twin/desired"
    auth = {"Authorization": f"Bearer {write_token}"}
    r = httpx.patch(url, json={"stock": {"red": 5}}, headers=auth)
    assert r.status_code == 428 and r.json()["error"] == "PreconditionRequired"
    r = httpx.patch(url, json={"stock": {"red": 5}}, headers={**auth, "If-Match": '"7"'})
    assert r.status_code == 412 and r.json()["version"] == 1 and r.headers["etag"] == '"1"'
    assert fdb.twin.find_one({"_id": "factory-1"})["version"] == 1  # nothing changed
    r = httpx.patch(url, json={"stock": {"red": 1}}, headers={**auth, "If-Match": '"1"'})
    assert r.status_code == 200, r.text
    assert r.headers["etag"] == '"2"' and r.json()["twin"]["desired"]["stock"] == {"red": 1}


def test_a_desired_stock_below_the_reported_one_ships_the_difference_and_above_it_is_refused(api, fdb, write_token):
    url = f"{api.url}/api/factories/factory-1/twin/desired"
    auth = {"Authorization": f"Bearer {write_token}"}
    reported_red = sum(1 for t in fdb.twin.find_one({"_id": "factory-1"})["reported"]["slots"].values() if t == "RED")
    assert reported_red == 1
    r = httpx.patch(url, json={"stock": {"red": 2}}, headers={**auth, "If-Match": '"1"'})
    assert r.status_code == 422 and "stock is added at the input station" in r.json()["message"]
    r = httpx.patch(url, json={"stock": {"red": 0}}, headers={**auth, "If-Match": '"1"'})
    assert r.status_code == 200, r.text
    orders = r.json()["orders"]
    assert [(o["type"], o["state"]) for o in orders] == [("RED", "queued")]
    assert r.json()["twin"]["orders"][0]["id"] == orders[0]["id"]
    listed = httpx.get(f"{api.url}/api/factories/factory-1/orders").json()
    assert [o["id"] for o in listed["items"]] == [orders[0]["id"]]
    assert listed["stock"] == {"reported": {"blue": 0, "red": 1, "white": 0}, "on_order": {"blue": 0, "red": 1, "white": 0},
                               "available": {"blue": 0, "red": 0, "white": 0}}


def test_a_posted_order_is_placed_once_per_idempotency_key_and_refused_when_no_piece_is_left(api, fdb, write_token):
    url = f"{api.url}/api/factories/factory-1/orders"
    auth = {"Authorization": f"Bearer {write_token}"}
    first = httpx.post(url, json={"type": "RED"}, headers={**auth, "Idempotency-Key": "5f0c2a7e"})
    assert first.status_code == 201, first.text
    order = first.json()
    assert (order["type"], order["colour"], order["state"]) == ("RED", "red", "queued")
    assert first.headers["location"] == f"/api/factories/factory-1/orders/{order['id']}"
    retry = httpx.post(url, json={"type": "RED"}, headers={**auth, "Idempotency-Key": "5f0c2a7e"})
    assert retry.status_code == 201 and retry.headers["idempotent-replayed"] == "true"
    assert retry.json() == order
    other = httpx.post(url, json={"type": "BLUE"}, headers={**auth, "Idempotency-Key": "5f0c2a7e"})
    assert other.status_code == 422 and other.json()["error"] == "IdempotencyKeyReused"
    # the one red piece the controller reports is on order now
    none_left = httpx.post(url, json={"type": "RED"}, headers={**auth, "Idempotency-Key": "91d4"})
    assert none_left.status_code == 409 and none_left.json()["error"] == "NoStock"
    assert "the controller reports 1 red in the rack and 1 is already on order" in none_left.json()["message"]
    assert fdb.db["twin_orders"].count_documents({}) == 1
    assert httpx.get(f"{url}/{order['id']}").json()["events"][0]["state"] == "queued"
    assert httpx.get(f"{url}/factory-1:nope").status_code == 404


def test_an_order_needs_a_write_token(api, fdb):
    from factory_assets.api.tokens import create_token

    url = f"{api.url}/api/factories/factory-1/orders"
    assert httpx.post(url, json={"type": "RED"}).status_code == 401
    reader = create_token(fdb, "dashboard", "read")
    assert httpx.post(url, json={"type": "RED"}, headers={"Authorization": f"Bearer {reader}"}).status_code == 403
    assert fdb.db["twin_orders"].count_documents({}) == 0


def test_writes_need_a_write_token_and_a_revoked_token_is_refused(api, fdb, write_token):
    from factory_assets.api.tokens import create_token, revoke_token

    url = f"{api.url}/api/factories/factory-1/twin/desired"
    body = {"stock": {"red": 1}}
    assert httpx.patch(url, json=body, headers={"If-Match": "1"}).status_code == 401
    r = httpx.patch(url, json=body, headers={"If-Match": "1", "Authorization": "Bearer fa_not-a-real-token"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    reader = create_token(fdb, "dashboard", "read")
    r = httpx.patch(url, json=body, headers={"If-Match": "1", "Authorization": f"Bearer {reader}"})
    assert r.status_code == 403 and r.json()["error"] == "Forbidden"
    assert revoke_token(fdb, "operator") == 1
    r = httpx.patch(url, json=body, headers={"If-Match": "1", "Authorization": f"Bearer {write_token}"})
    assert r.status_code == 401
    assert fdb.twin.find_one({"_id": "factory-1"})["version"] == 1
    assert fdb.db["api_tokens"].count_documents({"name": "operator"}) == 1
    assert write_token not in str(list(fdb.db["api_tokens"].find()))  # stored hashed


def test_reads_can_be_closed_and_then_need_a_token(fdb):
    from factory_assets.api.app import ApiSettings, TwinApiServer
    from factory_assets.api.tokens import create_token

    report(fdb, 0)
    token = create_token(fdb, "viewer", "read")
    with TwinApiServer(fdb, ApiSettings(open_reads=False)) as api:
        assert httpx.get(f"{api.url}/api/factories/factory-1/twin").status_code == 401
        assert httpx.get(f"{api.url}/api/factories/factory-1/twin",
                         headers={"Authorization": f"Bearer {token}"}).status_code == 200
        # EventSource and Unity WebGL cannot set headers: a query parameter works too
        assert httpx.get(f"{api.url}/api/factories/factory-1/twin", params={"token": token}).status_code == 200


@pytest.mark.parametrize("method,path,kwargs,status,error", [
    ("get", "/api/factories/nope/twin", {}, 404, "UnknownFactory"),
    ("get", "/api/factories/bad id!/twin", {}, 422, "InvalidRequest"),
    ("get", "/api/factories/factory-1/twin/history", {"params": {"limit": 0}}, 422, "InvalidRequest"),
    ("get", "/api/factories/factory-1/twin/history", {"params": {"limit": "many"}}, 422, "InvalidRequest"),
    ("get", "/api/factories/factory-1/twin/history", {"params": {"since": "yesterday"}}, 400, "BadParameter"),
    ("get", "/api/factories/factory-1/twin/history", {"params": {"cursor": "abc"}}, 422, "InvalidRequest"),
    ("get", "/api/factories/factory-1/twin/events", {"headers": {"Last-Event-ID": "x1"}}, 400, "BadVersion"),
    ("get", "/api/frames/zzz.jpg", {}, 400, "BadFrameId"),
    ("get", "/api/frames/0123456789abcdef01234567.jpg", {}, 404, "NoFrame"),
    ("get", "/api/frames/latest", {}, 404, "NoFrame"),
    ("patch", "/api/factories/factory-1/twin/desired", {"content": b"{not json", "headers": {"If-Match": "1", "Content-Type": "application/json"}}, 400, "MalformedJSON"),
    ("patch", "/api/factories/factory-1/twin/desired", {"json": {"stock": {"red": "2"}}, "headers": {"If-Match": "1"}}, 422, "InvalidRequest"),
    ("patch", "/api/factories/factory-1/twin/desired", {"json": {"stock": {"green": 1}}, "headers": {"If-Match": "1"}}, 422, "InvalidRequest"),
    ("patch", "/api/factories/factory-1/twin/desired", {"json": {"stock": {"red": 10}}, "headers": {"If-Match": "1"}}, 422, "InvalidRequest"),
    ("patch", "/api/factories/factory-1/twin/desired", {"json": {"stock": {"red": 1}, "x": 1}, "headers": {"If-Match": "1"}}, 422, "InvalidRequest"),
    ("patch", "/api/factories/factory-1/twin/desired", {"json": {"stock": {"red": 1}}, "headers": {"If-Match": "one"}}, 400, "BadVersion"),
    ("patch", "/api/factories/factory-1/twin/desired", {"json": {"stock": {"red": 9, "blue": 9}}, "headers": {"If-Match": "1"}}, 422, "DesiredInvalid"),
    ("patch", "/api/factories/factory-1/twin/desired", {"json": {"stock": {"red": 1, "blue": 1}}, "headers": {"If-Match": "1"}}, 422, "DesiredInvalid"),
    ("patch", "/api/factories/nope/twin/desired", {"json": {"stock": {"red": 1}}, "headers": {"If-Match": "1"}}, 404, "UnknownFactory"),
    ("patch", "/api/factories/factory-1/twin/desired", {"content": b"{" + b" " * 20000 + b"}", "headers": {"If-Match": "1", "Content-Type": "application/json"}}, 413, "PayloadTooLarge"),
    ("post", "/api/factories/factory-1/orders", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "MalformedJSON"),
    ("post", "/api/factories/factory-1/orders", {"json": {"type": "red"}}, 422, "InvalidRequest"),
    ("post", "/api/factories/factory-1/orders", {"json": {"type": "NONE"}}, 422, "InvalidRequest"),
    ("post", "/api/factories/factory-1/orders", {"json": {}}, 422, "InvalidRequest"),
    ("post", "/api/factories/factory-1/orders", {"json": {"type": "RED", "ts": "now"}}, 422, "InvalidRequest"),
    ("post", "/api/factories/factory-1/orders", {"json": {"type": "RED"}, "headers": {"Idempotency-Key": "a b"}}, 422, "InvalidRequest"),
    ("post", "/api/factories/factory-1/orders", {"json": {"type": "RED"}, "headers": {"Idempotency-Key": "k" * 256}}, 422, "InvalidRequest"),
    ("post", "/api/factories/factory-1/orders", {"json": {"type": "WHITE"}}, 409, "NoStock"),
    ("post", "/api/factories/nope/orders", {"json": {"type": "RED"}}, 404, "UnknownFactory"),
])
def test_every_bad_input_gets_a_clear_json_error_and_changes_nothing(api, fdb, write_token, method, path, kwargs,
                                                                      status, error):
    headers = {"Authorization": f"Bearer {write_token}", **kwargs.pop("headers", {})}
    r = httpx.request(method.upper(), api.url + path, headers=headers, **kwargs)
    assert (r.status_code, r.json()["error"]) == (status, error), r.text
    assert r.json()["message"]
    assert fdb.twin.find_one({"_id": "factory-1"})["version"] == 1
    assert fdb.db["twin_orders"].count_documents({}) == 0


def test_the_openapi_page_documents_the_routes(api):
    spec = httpx.get(f"{api.url}/openapi.json").json()
    assert {"/api/factories/{factory_id}/twin", "/api/factories/{factory_id}/twin/events",
            "/api/factories/{factory_id}/twin/desired", "/api/factories/{factory_id}/orders",
            "/api/factories/{factory_id}/orders/{order_id}"} <= set(spec["paths"])
    assert "post" in spec["paths"]["/api/factories/{factory_id}/orders"]
    assert httpx.get(f"{api.url}/docs").status_code == 200


def test_health_says_degraded_with_503_when_the_twin_reader_has_stopped(api):
    # a stopped reader leaves every stream silent: health must not answer "ok" then
    ok = httpx.get(f"{api.url}/api/health")
    assert ok.status_code == 200 and ok.json()["status"] == "ok" and ok.json()["reader_errors"] == 0
    api.hub._stop.set()  # the reader thread ends, as it would after an error it could not survive
    api.hub._thread.join(10)
    degraded = httpx.get(f"{api.url}/api/health")
    assert degraded.status_code == 503
    assert degraded.json()["status"] == "degraded" and degraded.json()["reader"] == "stopped"


def test_a_twin_document_the_reader_cannot_read_is_passed_over_and_other_factories_keep_streaming(api, fdb):
    # another tool's document (a version that is not a number) used to fail every read of every factory
    from factory_assets.storage.frames import wait_until

    fdb.twin.insert_one({"_id": "factory-odd", "version": "seven"})
    assert wait_until(lambda: api.hub.stats.bad_documents == 1, 10)
    events = api.hub.stats.events
    report(fdb, 1)
    assert wait_until(lambda: api.hub.stats.events > events, 10)  # factory-1's change was still emitted
    health = httpx.get(f"{api.url}/api/health")
    assert health.status_code == 200 and health.json()["bad_documents"] == 1


def test_health_says_degraded_while_the_running_reader_fails_every_read():
    # the reader outlives any error, so "alive" alone would answer ok with every stream silent
    import asyncio

    from pymongo import MongoClient

    from factory_assets.api.hub import DEGRADED_AFTER_FAILURES, TwinHub
    from factory_assets.storage.frames import wait_until
    from factory_assets.storage.mongo import CollectionNames, FactoryDB

    with socket.socket() as s:  # a port nothing listens on: MongoDB is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = MongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true", serverSelectionTimeoutMS=100)
    loop = asyncio.new_event_loop()
    hub = TwinHub(FactoryDB(client["down"], CollectionNames()), change_streams=False).start(loop)
    try:
        assert wait_until(lambda: hub.stats.failing >= DEGRADED_AFTER_FAILURES, 30)
        assert hub.alive() and not hub.healthy()
    finally:
        hub.close()
        loop.close()
        client.close()
