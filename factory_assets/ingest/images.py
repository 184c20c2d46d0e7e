"""The ingester's image check: ``vision.decode.inspect_image``'s answer without decoding the pixels.

``inspect_image`` decodes every image to learn its size and to refuse what cannot be decoded.
For a camera frame that decode was the ingester's largest cost (about 0.5 ms of a 320x240
JPEG, more than half the ingester's CPU, see docs/benchmarks.md), and it refuses less than it
seems: libjpeg decodes a JPEG whose entropy-coded data is damaged (bytes flipped, zeroed)
with a warning, so what the decode actually refuses is a JPEG whose *headers* are wrong. This
module reads those headers instead: markers and segment lengths from SOI to SOS, the frame
header (size, precision, components), that every quantisation and Huffman table the frame and
scan name is defined, and the end-of-image marker. A baseline or extended sequential JPEG
(SOF0/SOF1, 8 bits, 1 or 3 components: what the TXT camera, OpenCV and most cameras write)
that passes is accepted with the size from its frame header; anything else (progressive,
arithmetic, 12-bit, CMYK, PNG, an unusual layout) goes to ``inspect_image``, so its answer is
exactly what it was. The tests hold the two to the same answers on generated and damaged images.
"""
from __future__ import annotations

from factory_assets.vision.decode import (JPEG, ImageInfo, check_size_and_type, inspect_image,
                                          sniff_content_type)

_SEQUENTIAL_HUFFMAN = (0xC0, 0xC1)  # SOF0 baseline, SOF1 extended sequential
_SKIPPED = tuple(range(0xE0, 0xF0)) + (0xFE, 0xDD)  # APPn, COM, DRI: read past
_STANDALONE = tuple(range(0xD0, 0xD8)) + (0x01,)  # RSTn, TEM: no length
MAX_SIDE = 65500  # libjpeg's JPEG_MAX_DIMENSION
MAX_PIXELS = 1 << 30  # OpenCV's CV_IO_MAX_IMAGE_PIXELS


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a sequential Huffman JPEG whose headers are complete and consistent;
    None for any JPEG this reader does not vouch for (the full decode decides)."""
    pos, end = 2, len(data)
    quant: set[int] = set()
    huffman: set[tuple[int, int]] = set()  # (class 0 DC / 1 AC, id)
    frame = None  # (width, height, {component id: quant table})
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in (0xD8, 0xD9):  # a second SOI, or EOI before any scan
            return None
        length = (data[pos + 2] << 8) | data[pos + 3]
        body, nxt = pos + 4, pos + 2 + length
        if length < 2 or nxt > end:
            return None
        if marker == 0xDB:  # DQT: one or more tables of 64 values, 8 or 16 bits
            p = body
            while p < nxt:
                precision, table = data[p] >> 4, data[p] & 0x0F
                if precision > 1 or table > 3:
                    return None
                quant.add(table)
                p += 1 + 64 * (precision + 1)
            if p != nxt:
                return None
        elif marker == 0xC4:  # DHT: one or more tables: class/id, 16 counts, the values
            p = body
            while p < nxt:
                if p + 17 > nxt:
                    return None
                cls, table = data[p] >> 4, data[p] & 0x0F
                if cls > 1 or table > 3:
                    return None
                counts = data[p + 1:p + 17]
                count = sum(counts)
                if count == 0 or count > 256 or p + 17 + count > nxt:
                    return None
                code = 0  # the codes must fit their lengths (libjpeg's check: a full length is refused)
                for bits, n in enumerate(counts, start=1):
                    code += n
                    if n and code >= 1 << bits:
                        return None
                    code <<= 1
                if cls == 0 and max(data[p + 17:p + 17 + count]) > 15:  # a DC symbol is a bit count
                    return None
                huffman.add((cls, table))
                p += 17 + count
            if p != nxt:
                return None
        elif marker in _SEQUENTIAL_HUFFMAN:
            if frame is not None or length < 8:
                return None
            precision, height = data[body], (data[body + 1] << 8) | data[body + 2]
            width, ncomp = (data[body + 3] << 8) | data[body + 4], data[body + 5]
            if precision != 8 or ncomp not in (1, 3) or length != 8 + 3 * ncomp or not width or not height:
                return None
            if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
                return None
            components, sampling = {}, []
            for k in range(ncomp):
                cid, hv, qt = data[body + 6 + 3 * k], data[body + 7 + 3 * k], data[body + 8 + 3 * k]
                if cid in components or not (1 <= hv >> 4 <= 4 and 1 <= hv & 0x0F <= 4) or qt > 3:
                    return None
                components[cid] = qt
                sampling.append((hv >> 4, hv & 0x0F))
            max_h, max_v = max(h for h, _ in sampling), max(v for _, v in sampling)
            if (sum(h * v for h, v in sampling) > 10  # blocks per MCU of an interleaved scan
                    or any(max_h % h or max_v % v for h, v in sampling)):  # fractional upsampling
                return None
            frame = (width, height, components)
        elif marker == 0xDA:  # SOS: the tables it names must be defined by now
            if frame is None or length < 6:
                return None
            ns = data[body]
            if not 1 <= ns <= len(frame[2]) or length != 6 + 2 * ns:
                return None
            seen = set()
            for k in range(ns):
                cid, tables = data[body + 1 + 2 * k], data[body + 2 + 2 * k]
                if cid in seen or cid not in frame[2] or frame[2][cid] not in quant:
                    return None
                seen.add(cid)
                if (0, tables >> 4) not in huffman or (1, tables & 0x0F) not in huffman:
                    return None
            ss, se, approx = data[nxt - 3], data[nxt - 2], data[nxt - 1]
            if (ss, se, approx) != (0, 63, 0) or ns != len(frame[2]):  # one interleaved sequential scan
                return None
            return frame[0], frame[1]
        elif marker not in _SKIPPED:  # progressive, lossless, arithmetic, DNL, unknown: not vouched for
            return None
        elif marker == 0xDD and length != 4:  # DRI holds one 16-bit interval
            return None
        pos = nxt
    return None


def _ends_with_eoi(data: bytes) -> bool:
    """``vision.decode``'s completeness check (EOI, trailing zero bytes allowed) without copying the image."""
    end = len(data)
    while end and data[end - 1] == 0:
        end -= 1
    return end >= 2 and data[end - 2] == 0xFF and data[end - 1] == 0xD9


def inspect_frame(data: bytes, declared_type: str | None = None, max_bytes: int | None = None) -> ImageInfo:
    """``inspect_image(data, declared_type, max_bytes)``, reading a sequential JPEG's headers
    instead of decoding it; the same :class:`ImageDecodeError` reasons."""
    check_size_and_type(data, declared_type, max_bytes)
    if sniff_content_type(data) == JPEG and _ends_with_eoi(data):
        size = _jpeg_size(data)
        if size is not None:
            return ImageInfo(content_type=JPEG, width=size[0], height=size[1], size=len(data))
    return inspect_image(data, declared_type, max_bytes)  # PNG, a truncated or unusual JPEG: decoded
