"""``factory-assets dataset import DIR``: an existing dataset in the original layout
(``train-imgs/``, ``valid-imgs/``, ``train-annots/train.lst``,
``valid-annots/valid.lst``) becomes frames (camera ``import``) and labels
(source ``import``, the split the file assigned kept).

Everything is checked first — manifests, paths, images — and only then written,
so a bad dataset leaves nothing behind. Re-importing stores nothing new: an
imported frame is recognised by its content hash.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from factory_assets.datasets.labels import label_doc, upsert_labels
from factory_assets.datasets.lst import ManifestError, read_lst

SPLITS = ("train", "valid")
IMPORT_CAMERA = "import"


class DatasetImportError(ValueError):
    """The dataset cannot be imported; the message names the file (and line)."""


@dataclass
class ImportSummary:
    frames_new: int = 0
    frames_existing: int = 0
    labels: dict = field(default_factory=dict)
    by_split: dict = field(default_factory=dict)


@dataclass
class _Item:
    split: str
    lst: Path
    index: int
    labels: tuple
    rel: str
    data: bytes
    content_type: str
    width: int
    height: int
    mtime: datetime


def scan_dataset(root: Path) -> list[_Item]:
    """Validate the whole dataset; raise ``DatasetImportError`` on the first problem."""
    from factory_assets.vision.decode import ImageDecodeError, inspect_image

    root = Path(root)
    if not root.is_dir():
        raise DatasetImportError(f"{root}: not a folder")
    items: list[_Item] = []
    for split in SPLITS:
        lst = root / f"{split}-annots" / f"{split}.lst"
        image_dir = root / f"{split}-imgs"
        if not lst.is_file():
            raise DatasetImportError(f"{lst}: missing (expected the original layout: {split}-imgs/ and "
                                     f"{split}-annots/{split}.lst)")
        try:
            rows = read_lst(lst, image_dir=image_dir)
        except ManifestError as exc:
            raise DatasetImportError(str(exc)) from None
        if not rows:
            raise DatasetImportError(f"{lst}: the {split} split is empty")
        for row in rows:
            path = image_dir / row.path
            data = path.read_bytes()
            try:
                info = inspect_image(data)
            except ImageDecodeError as exc:
                raise DatasetImportError(f"{lst}:{row.line}: image {row.path!r} is not usable "
                                         f"({exc.reason}: {exc})") from None
            mtime = datetime.fromtimestamp(int(path.stat().st_mtime), tz=timezone.utc)
            items.append(_Item(split, lst, row.index, row.labels, row.path, data, info.content_type,
                               info.width, info.height, mtime))
    return items


def import_dataset(fdb, root: Path, *, dataset_name: str | None = None) -> ImportSummary:
    from factory_assets.storage.frames import build_frame, insert_frames
    from factory_assets.vocabulary import CLASSES

    root = Path(root)
    items = scan_dataset(root)  # raises before anything is written
    name = dataset_name or root.resolve().name
    summary = ImportSummary()
    shas = [hashlib.sha256(i.data).hexdigest() for i in items]
    existing = {d["sha256"] for d in fdb.frames.find({"camera_id": IMPORT_CAMERA, "sha256": {"$in": shas}},
                                                      {"sha256": 1})}
    pending, seen = [], set(existing)
    for item, sha in zip(items, shas):
        if sha in seen:
            continue  # already imported, or the same picture twice in this dataset: one frame
        seen.add(sha)
        pending.append(build_frame(item.data, ts=item.mtime, camera_id=IMPORT_CAMERA, factory_id="import",
                                   content_type=item.content_type, width=item.width, height=item.height,
                                   source={"kind": "import", "dataset": name,
                                           "path": f"{item.split}-imgs/{item.rel}"}))
    if pending:
        summary.frames_new = insert_frames(fdb, pending).inserted
    frames = {d["sha256"]: d for d in fdb.frames.find({"camera_id": IMPORT_CAMERA, "sha256": {"$in": shas}},
                                                       {"image": 0})}
    summary.frames_existing = len(existing)
    docs = []
    for item, sha in zip(items, shas):
        frame = frames[sha]
        docs.append(label_doc(frame, dict(zip(CLASSES, map(bool, item.labels))), "import", split=item.split,
                              provenance={"dataset": name, "file": str(item.lst.relative_to(root)),
                                          "index": item.index, "path": item.rel}))
        summary.by_split[item.split] = summary.by_split.get(item.split, 0) + 1
    summary.labels = upsert_labels(fdb, docs)
    return summary
