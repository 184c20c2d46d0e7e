"""SageMaker image-classification ``.lst`` manifests (``multi_label=1``).

A line is ``index<TAB>blue<TAB>red<TAB>white<TAB>relative/path.jpeg``: one-hot
labels in class order, the path relative to the split's image folder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from factory_assets.vocabulary import CLASSES, SLOTS


class ManifestError(ValueError):
    """A bad manifest line; the message names the file and line."""


@dataclass(frozen=True)
class LstRow:
    index: int
    labels: tuple[int, ...]
    path: str
    line: int = field(default=0, compare=False)  # where it was read, for error messages

    @property
    def present(self) -> dict[str, bool]:
        return {c: bool(v) for c, v in zip(CLASSES, self.labels)}


def _indexed_rows(path: Path, n_columns: int, columns: str, comments: bool = False):
    """The tab-separated rows of a manifest or its sidecar: (``file:line``, line, index, columns),
    refusing a row with the wrong column count or a non-integer index, naming file and line."""
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or (comments and line.startswith("#")):
            continue
        where = f"{path}:{lineno}"
        cols = line.rstrip("\r\n").split("\t")
        if len(cols) != n_columns:
            raise ManifestError(f"{where}: expected {n_columns} tab-separated columns ({columns}), "
                                f"found {len(cols)}")
        try:
            index = int(cols[0])
        except ValueError:
            raise ManifestError(f"{where}: index {cols[0]!r} is not an integer") from None
        yield where, lineno, index, cols


def read_lst(path: Path, image_dir: Path | None = None, n_classes: int = len(CLASSES)) -> list[LstRow]:
    """Parse and validate a manifest. With ``image_dir``, every path must exist inside it."""
    path = Path(path)
    rows: list[LstRow] = []
    seen: dict[int, int] = {}
    root = Path(image_dir).resolve() if image_dir is not None else None
    for where, lineno, index, cols in _indexed_rows(path, n_classes + 2, f"index, {', '.join(CLASSES)}, path"):
        if index in seen:
            raise ManifestError(f"{where}: duplicate index {index} (first on line {seen[index]})")
        seen[index] = lineno
        labels = []
        for name, value in zip(CLASSES, cols[1:-1]):
            value = value.strip()
            if value not in ("0", "1", "0.0", "1.0"):
                raise ManifestError(f"{where}: label {name}={value!r} is not 0 or 1")
            labels.append(int(float(value)))
        rel = cols[-1].strip()
        if not rel:
            raise ManifestError(f"{where}: empty image path")
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise ManifestError(f"{where}: image path {rel!r} escapes the dataset folder")
        if root is not None:
            full = (root / rel).resolve()
            if root not in full.parents:
                raise ManifestError(f"{where}: image path {rel!r} escapes the dataset folder")
            if not full.is_file():
                raise ManifestError(f"{where}: image {rel!r} does not exist in {root}")
        rows.append(LstRow(index, tuple(labels), rel, lineno))
    return rows


def format_lst(rows: list[LstRow]) -> str:
    return "".join(f"{r.index}\t" + "\t".join(str(v) for v in r.labels) + f"\t{r.path}\n" for r in rows)


def write_lst(path: Path, rows: list[LstRow]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_lst(rows), encoding="utf-8")


# ---------------------------------------------------------------------------
# per-slot sidecar: ``<split>-annots/<split>.slots`` next to the ``.lst`` (SageMaker reads only
# the ``.lst``). A line is ``index<TAB>A1<TAB>...<TAB>C3<TAB>relative/path`` with ``BLUE``, ``RED``,
# ``WHITE`` or ``-`` (empty) per slot; the index and path are those of the ``.lst`` line. Frames
# whose label has presence only (a manual correction, an imported photo) have no line.

SLOT_NAMES: tuple[str, ...] = SLOTS
SLOT_TYPES = ("BLUE", "RED", "WHITE")
SLOTS_HEADER = "# index\t" + "\t".join(SLOT_NAMES) + "\tpath\n"


def slots_path(lst_path: Path) -> Path:
    return Path(lst_path).with_suffix(".slots")


def format_slots(rows: list[tuple[int, dict, str]]) -> str:
    """``[(index, slot -> type or None, path)]`` -> sidecar text."""
    lines = [SLOTS_HEADER]
    for index, slots, rel in rows:
        lines.append(f"{index}\t" + "\t".join((slots.get(s) or "-") for s in SLOT_NAMES) + f"\t{rel}\n")
    return "".join(lines)


def read_slots(path: Path) -> dict[int, dict]:
    """Sidecar -> index -> slot -> type or None. A missing file is an empty mapping."""
    path = Path(path)
    if not path.is_file():
        return {}
    out: dict[int, dict] = {}
    for where, _lineno, index, cols in _indexed_rows(path, len(SLOT_NAMES) + 2, "index, A1..C3, path",
                                                     comments=True):
        slots = {}
        for name, value in zip(SLOT_NAMES, cols[1:-1]):
            value = value.strip().upper()
            if value not in SLOT_TYPES + ("-", ""):
                raise ManifestError(f"{where}: slot {name}={value!r} is not BLUE, RED, WHITE or -")
            slots[name] = value if value in SLOT_TYPES else None
        if index in out:
            raise ManifestError(f"{where}: duplicate index {index}")
        out[index] = slots
    return out
