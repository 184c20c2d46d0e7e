"""The twin as a picture the Dagster UI shows without a click.

The UI renders a Markdown metadata value inline only when it is shorter than 1,000
characters (longer ones, like a PNG in a data URL, sit behind "[Show Markdown]"; the UI has
no image metadata type). So the rack is drawn as a tiny SVG in a data URL: the slots as the
controller reports them, as the camera sees them (per-slot model) and the colours vision
observes, slots that disagree outlined in red. The full PNG (with probabilities and the
disagreements spelled out) stays in ``twin_detail``.
"""
from __future__ import annotations

from urllib.parse import quote

from factory_assets.twin.state import COLOURS, SLOTS

INLINE_LIMIT = 1000  # the UI's limit for Markdown shown inline
FILL = {"BLUE": "#36c", "RED": "#d33", "WHITE": "#fff", None: "#ddd"}  # white pieces get a dark edge
CELL, PITCH, TOP = 8, 10, 10  # a slot's square, the distance between slots, the first row's y
PANEL = 36                    # the distance between two panels
Q = "'"


def _cells(x0: int, kinds: dict) -> dict[str | None, list[str]]:
    """slot -> type for one rack at x0 -> fill -> path pieces of its squares."""
    paths: dict[str | None, list[str]] = {}
    for i, slot in enumerate(SLOTS):
        row, col = divmod(i, 3)
        kind = kinds.get(slot) if kinds.get(slot) in FILL else None
        paths.setdefault(kind, []).append(f"M{x0 + col * PITCH},{TOP + row * PITCH}h{CELL}v{CELL}h-{CELL}z")
    return paths


def twin_svg(doc: dict | None, outlines: bool = True) -> str:
    """The twin document as a small SVG (see the module docstring)."""
    doc = doc or {}
    observed = doc.get("observed") or {}
    delta = doc.get("delta") or {}
    reported = ((doc.get("reported") or {}).get("slots")) or {}
    seen = {s: (v or {}).get("type") for s, v in (observed.get("slots") or {}).items()}
    panels = [("reported", reported)] + ([("seen", seen)] if seen else [])
    fills: dict[str | None, list[str]] = {}
    labels = []
    for n, (label, kinds) in enumerate(panels):
        for kind, pieces in _cells(n * PANEL, kinds).items():
            fills.setdefault(kind, []).extend(pieces)
        labels.append(f"<text x='{n * PANEL}' y='7'>{label}</text>")
    x = len(panels) * PANEL  # the colours vision observes: filled when present
    for i, colour in enumerate(COLOURS):
        kind = colour.upper() if (observed.get(colour) or {}).get("present") else None
        fills.setdefault(kind, []).append(f"M{x},{TOP + i * PITCH}h{CELL}v{CELL}h-{CELL}z")
    labels.append(f"<text x='{x}' y='7'>observed</text>")
    # disagreements outlined on the last rack (the camera's when there is one) and the colours
    last = (len(panels) - 1) * PANEL
    outline = [f"M{last + (i % 3) * PITCH},{TOP + (i // 3) * PITCH}h{CELL}v{CELL}h-{CELL}z"
               for i, slot in enumerate(SLOTS) if slot in (delta.get("slots") or {})] if outlines else []
    outline += [f"M{x},{TOP + i * PITCH}h{CELL}v{CELL}h-{CELL}z" for i, c in enumerate(COLOURS)
                if c in delta and outlines]
    body = "".join(f"<path fill='{FILL[kind]}'{' stroke=%s#555%s' % (Q, Q) if kind == 'WHITE' else ''} "
                   f"d='{''.join(p)}'/>" for kind, p in fills.items())
    if outline:
        body += f"<path fill='none' stroke='red' stroke-width='2' d='{''.join(outline)}'/>"
    # width: an intrinsic size, without which the UI's metadata cell lays the picture out 0 px wide
    return (f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {x + 30} 40' width='{3 * (x + 30)}' font-size='7' "
            f"font-family='sans-serif'>{''.join(labels)}<g stroke='#999'>{body}</g></svg>")


def twin_markdown(doc: dict | None) -> str:
    """``twin_svg`` as Markdown short enough for the UI to show it inline (without the red
    outlines in the unlikely case that they would make it too long)."""
    for outlines in (True, False):
        text = f"![twin](data:image/svg+xml,{quote(twin_svg(doc, outlines), safe=chr(39) + '/=:,.-')})"
        if len(text) < INLINE_LIMIT:
            break
    return text
