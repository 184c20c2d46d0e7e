"""The ingester's image check reads a JPEG's headers instead of decoding it, with the decoder's answers."""
from __future__ import annotations

import random

import cv2
import numpy as np
import pytest

from factory_assets.ingest.images import _jpeg_size, inspect_frame
from factory_assets.vision.decode import ImageDecodeError, inspect_image
from factory_assets_tests.helpers import jpeg_bytes, png_bytes


def encode(width: int, height: int, *params: int, gray: bool = False) -> bytes:
    rng = np.random.default_rng(width * height)
    pixels = rng.integers(0, 255, (height, width) if gray else (height, width, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 90, *params])
    assert ok
    return buf.tobytes()


SEQUENTIAL = {
    "camera frame 320x240": jpeg_bytes(quality=93),
    "odd size 17x9": encode(17, 9),
    "greyscale 640x480": encode(640, 480, gray=True),
    "4:4:4": encode(64, 48, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444),
    "4:2:2": encode(64, 48, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422),
    "restart markers": encode(64, 48, cv2.IMWRITE_JPEG_RST_INTERVAL, 2),
    "optimised tables": encode(33, 65, cv2.IMWRITE_JPEG_OPTIMIZE, 1),
}


def answer(inspect, data: bytes, declared: str | None = "image/jpeg"):
    try:
        info = inspect(data, declared)
        return "stored", info.content_type, info.width, info.height, info.size
    except ImageDecodeError as exc:
        return "quarantined", exc.reason


@pytest.mark.parametrize("name", list(SEQUENTIAL))
def test_a_sequential_jpeg_is_measured_from_its_headers_as_the_decoder_measures_it(name):
    data = SEQUENTIAL[name]
    assert _jpeg_size(data) is not None  # read, not decoded
    assert answer(inspect_frame, data) == answer(inspect_image, data)


def test_what_the_headers_do_not_vouch_for_is_decoded_as_before():
    progressive = encode(100, 100, cv2.IMWRITE_JPEG_PROGRESSIVE, 1)
    assert _jpeg_size(progressive) is None
    camera = SEQUENTIAL["camera frame 320x240"]
    for data, declared in ((progressive, "image/jpeg"), (png_bytes(), "image/png"), (png_bytes()[:-20], None),
                           (camera[: len(camera) // 2], "image/jpeg"), (b"\xff\xd8\xff\xe0" + b"x" * 99 + b"\xff\xd9", None),
                           (camera, "image/gif"), (b"GIF89a", None)):
        assert answer(inspect_frame, data, declared) == answer(inspect_image, data, declared)
    with pytest.raises(ImageDecodeError) as err:
        inspect_frame(camera, "image/jpeg", max_bytes=len(camera) - 1)
    assert err.value.reason == "oversize"


def test_jpegs_with_damaged_headers_get_the_decoders_answer():
    # 1 to 3 bytes of the headers (SOI to the end of SOS) replaced, flipped, zeroed or set to 0xFF:
    # whatever the header reader accepts, the decoder accepts with the same size; the rest it decodes
    rng = random.Random(20)
    originals = list(SEQUENTIAL.values())
    read = 0
    for _ in range(1500):
        data = bytearray(rng.choice(originals))
        end = data.find(b"\xff\xda") + 14
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(2, end)
            data[at] = rng.choice([rng.randrange(256), data[at] ^ (1 << rng.randrange(8)), 0, 0xFF])
        data = bytes(data)
        read += _jpeg_size(data) is not None
        assert answer(inspect_frame, data) == answer(inspect_image, data), data[:end].hex()
    assert read > 300  # many damaged headers still describe an image; the rest went to the decoder


def test_a_jpeg_whose_pixels_are_damaged_is_stored_as_the_decoder_stores_it():
    # libjpeg decodes damaged entropy-coded data with a warning: decoding never refused these
    data = bytearray(SEQUENTIAL["camera frame 320x240"])
    data[len(data) // 2: len(data) // 2 + 500] = bytes(500)
    assert answer(inspect_frame, bytes(data)) == answer(inspect_image, bytes(data)) == ("stored", "image/jpeg",
                                                                                       320, 240, len(data))
