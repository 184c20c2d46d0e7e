"""Image bytes -> pixels, with the checks that keep bad frames out.

Pure functions: no MongoDB, no Dagster. ``inspect_image`` is what ingestion
calls; ``decode_image`` is what models call.
"""
from __future__ import annotations

from dataclasses import dataclass

from factory_assets.vocabulary import FormatError

JPEG = "image/jpeg"
PNG = "image/png"
SUPPORTED_CONTENT_TYPES = (JPEG, PNG)
# Accepted as declared content types, then sniffed from the bytes.
GENERIC_CONTENT_TYPES = ("application/x-image", "application/octet-stream", "image/jpg")


class ImageDecodeError(FormatError):
    """An image that cannot be used; ``reason`` is a short machine-readable code."""


@dataclass(frozen=True)
class ImageInfo:
    content_type: str
    width: int
    height: int
    size: int


def sniff_content_type(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return JPEG
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return PNG
    return None


def _check_complete(data: bytes, content_type: str) -> None:
    # OpenCV decodes a truncated JPEG into a half-grey picture with only a warning,
    # so completeness is checked on the bytes: JPEG ends with EOI, PNG with IEND.
    if content_type == JPEG:
        if data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
            raise ImageDecodeError("truncated_image", "JPEG is truncated (no end-of-image marker)")
    elif content_type == PNG:
        if b"IEND" not in data[-16:]:
            raise ImageDecodeError("truncated_image", "PNG is truncated (no IEND chunk)")


def decode_image(data: bytes):
    """Decode JPEG/PNG bytes to a BGR ``uint8`` array (H, W, 3)."""
    import cv2
    import numpy as np

    if not data:
        raise ImageDecodeError("empty_image", "image is empty")
    content_type = sniff_content_type(data)
    if content_type is None:
        raise ImageDecodeError("unknown_content_type", "bytes are neither JPEG nor PNG")
    _check_complete(data, content_type)
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ImageDecodeError("undecodable_image", f"{content_type} could not be decoded")
    return img


def check_size_and_type(data: bytes, declared_type: str | None = None, max_bytes: int | None = None) -> None:
    """The checks made before any image byte is read: the size limit and the declared content type."""
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageDecodeError("oversize", f"image is {len(data)} bytes, over the limit of {max_bytes}")
    if declared_type:
        declared = declared_type.split(";")[0].strip().lower()
        if declared not in SUPPORTED_CONTENT_TYPES + GENERIC_CONTENT_TYPES:
            raise ImageDecodeError("unsupported_content_type", f"content type {declared_type!r} is not supported")


def inspect_image(data: bytes, declared_type: str | None = None, max_bytes: int | None = None) -> ImageInfo:
    """Validate an image for storage; raises ImageDecodeError with a reason code."""
    check_size_and_type(data, declared_type, max_bytes)
    sniffed = sniff_content_type(data)
    if sniffed is None:
        raise ImageDecodeError("unknown_content_type", "bytes are neither JPEG nor PNG")
    img = decode_image(data)
    return ImageInfo(content_type=sniffed, width=int(img.shape[1]), height=int(img.shape[0]), size=len(data))

