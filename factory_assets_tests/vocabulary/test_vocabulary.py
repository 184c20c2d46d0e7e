"""The factory's vocabulary: one definition of colours, slots, topics and message formats."""
import base64
from datetime import datetime, timezone

import pytest

from factory_assets.vocabulary import (CLASSES, SLOT_STATES, SLOTS, STATE_TO_TYPE, TYPE_TO_COLOUR, TYPE_TO_STATE,
                                       TYPES, FormatError, parse_data_url, parse_day, parse_ts, reported_presence,
                                       slot_colours, stock_slots)


def test_colours_slots_and_types_agree_with_each_other():
    assert CLASSES == ("blue", "red", "white")  # the probability order of every model and manifest
    assert SLOTS == ("A1", "A2", "A3", "B1", "B2", "B3", "C1", "C2", "C3")
    assert [TYPE_TO_COLOUR[t] for t in TYPES] == list(CLASSES)
    assert all(STATE_TO_TYPE[TYPE_TO_STATE[t]] == t for t in TYPES)
    assert SLOT_STATES[0] == "empty" and SLOT_STATES[1:] == CLASSES


def test_timestamps_are_read_as_aware_utc_from_every_form_the_factory_sends():
    moment = datetime(2026, 11, 23, 10, 0, 0, 123000, tzinfo=timezone.utc)
    assert parse_ts("2026-11-23T10:00:00.123Z") == moment
    assert parse_ts("2026-11-23T11:00:00.123+01:00") == moment
    assert parse_ts("2026-11-23T10:00:00.123") == moment  # naive means UTC
    assert parse_ts(moment.timestamp()) == moment
    assert parse_ts(int(moment.timestamp() * 1000)) == moment  # epoch milliseconds
    for bad in ("", "yesterday", True, None):
        with pytest.raises(ValueError):
            parse_ts(bad)


def test_a_day_is_midnight_utc_and_a_bad_day_names_itself():
    assert parse_day("2026-11-25") == datetime(2026, 11, 25, tzinfo=timezone.utc)
    with pytest.raises(ValueError, match="2026-13-01"):
        parse_day("2026-13-01")


def test_data_urls_give_their_declared_type_and_bytes_and_bad_ones_a_quarantine_reason():
    payload = b"\xff\xd8\xffjpeg"
    url = "data:image/jpeg;base64," + base64.b64encode(payload).decode()
    assert parse_data_url(url) == ("image/jpeg", payload)
    assert parse_data_url(base64.b64encode(payload).decode()) == (None, payload)  # bare base64
    for bad, reason in (("data:image/jpeg;base64", "bad_data_url"), ("data:image/jpeg,abc", "bad_data_url"),
                        ("data:image/jpeg;base64,@@@", "bad_base64")):
        with pytest.raises(FormatError) as err:
            parse_data_url(bad)
        assert err.value.reason == reason


def test_the_stock_report_becomes_slots_colours_and_presence():
    report = {"stockItems": [{"location": "A1", "workpiece": {"type": "red"}},
                             {"location": "B2", "workpiece": {"type": "WHITE"}},
                             {"location": "C3", "workpiece": None},
                             {"location": "Z9", "workpiece": {"type": "BLUE"}}]}  # unknown slot: ignored
    slots = stock_slots(report)
    assert slots == {**{s: None for s in SLOTS}, "A1": "RED", "B2": "WHITE"}
    assert slot_colours(slots)["A1"] == "red" and slot_colours(slots)["C3"] is None
    assert reported_presence(slots) == {"blue": False, "red": True, "white": True}
    assert stock_slots(None) == {s: None for s in SLOTS}


def test_the_ingester_reads_a_stock_report_only_in_the_controllers_shape():
    from factory_assets.vocabulary.messages import parse_stock_report

    report = {"stockItems": [{"location": "A1", "workpiece": {"type": "red", "id": "wp-1"}},
                             {"location": "C3", "workpiece": None}, {"location": "B2"}]}
    assert parse_stock_report(report) == {"A1": "RED", "C3": None, "B2": None}
    for items, reason, words in (
            (None, "missing_field", "'stockItems' list"),
            ([{"workpiece": None}], "missing_field", "'location'"),
            (["A1"], "missing_field", "'location'"),
            ([{"location": "A1", "workpiece": "RED"}], "bad_stock_item", "'workpiece' must be an object or null"),
            ([{"location": ["A1"], "workpiece": None}], "bad_stock_item", "A1..C3"),
            ([{"location": "Z9", "workpiece": None}], "bad_stock_item", "A1..C3"),
            ([{"location": "A1", "workpiece": {"type": "GREEN"}}], "bad_stock_item", "BLUE, RED, WHITE"),
            ([{"location": "A1", "workpiece": {"type": ["RED"]}}], "bad_stock_item", "BLUE, RED, WHITE")):
        with pytest.raises(FormatError) as err:
            parse_stock_report({"stockItems": items})
        assert err.value.reason == reason and words in str(err.value), (items, str(err.value))


def test_a_stored_stock_report_of_any_shape_is_read_without_crashing():
    # reports stored before the ingester checked their shape (or written by another tool)
    report = {"stockItems": [{"location": ["A1"], "workpiece": {"type": "RED"}}, {"location": "A2", "workpiece": "RED"},
                             "B1", None, {"location": "B2", "workpiece": {"type": "BLUE"}}]}
    assert stock_slots(report) == {**{s: None for s in SLOTS}, "B2": "BLUE"}
    assert stock_slots({"stockItems": "A1"}) == stock_slots([1]) == {s: None for s in SLOTS}


def test_a_camera_url_is_shown_without_its_credentials():
    from factory_assets.vocabulary.messages import redact_url

    assert redact_url("rtsp://admin:s3cret@10.0.0.5:554/live") == "rtsp://***@10.0.0.5:554/live"
    # cameras take passwords unencoded: an '@' or '/' in one must not leave part of it shown
    assert redact_url("rtsp://admin:p@ss@cam:554/live") == "rtsp://***@cam:554/live"
    assert "pa/ss" not in redact_url("rtsp://admin:pa/ss@cam/live")
    assert redact_url("rtsp://cam:554/live") == "rtsp://cam:554/live"
    assert redact_url("/videos/line@2.avi") == "/videos/line@2.avi"  # a file path is not a URL
