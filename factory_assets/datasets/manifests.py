"""Training datasets in the exact layout of the original project and SageMaker's
built-in image classifier (``multi_label=1``)::

    all-imgs/  train-imgs/  valid-imgs/  train-annots/train.lst  valid-annots/valid.lst

Splits are deterministic and sticky: imported labels keep the split their file
gave; every other frame is assigned once (stratified by label combination, by a
hash of its content) and the assignment is stored in ``dataset_splits``, so a
frame never changes side when the dataset is rebuilt or new days are added.
The dataset is written to a temporary folder and renamed into
``<root>/<version>`` only when complete; the version is a content hash of the
manifests and images. Each build is recorded in MongoDB ``datasets``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from factory_assets.datasets.labels import combination, effective_labels
from factory_assets.datasets.lst import SLOT_NAMES, LstRow, format_lst, format_slots
from factory_assets.vocabulary import CLASSES
from factory_assets.vocabulary import utcnow

SPLITS_COLLECTION = "dataset_splits"
SITUATIONS_COLLECTION = "dataset_situations"  # one document per stock situation, looked up by _id
VALID_EVERY = 5  # one stock situation in five (the 2nd, 7th, 12th...) goes to validation
FETCH_BATCH = 200
EXTENSIONS = {"image/jpeg": ".jpg", "image/png": ".png"}


class DatasetBuildError(ValueError):
    """The labelled frames do not make a usable dataset (e.g. an empty split)."""


def _hash_key(label: dict) -> str:
    return hashlib.sha256(f"{label.get('frame_sha256') or label['frame_id']}".encode()).hexdigest()


def situation_of(label: dict) -> str:
    """The stock situation a label shows: its per-slot stock (``A1=BLUE,A2=-,...``) when
    known, else its colour combination. Validation holds out whole situations."""
    slots = label.get("slots")
    if slots and all(s in slots for s in SLOT_NAMES):
        return ",".join(f"{s}={slots.get(s) or '-'}" for s in SLOT_NAMES)
    return combination(label["present"])


def _situation_id(key: str) -> str:
    return "situation:" + hashlib.sha256(key.encode()).hexdigest()[:24]


def _situation_splits(fdb, keys: list[str]) -> dict:
    """situation -> split, assigned once and stored in ``dataset_situations`` (looked up by
    ``_id``): in order of first appearance the 2nd, 7th, 12th... new situation goes to
    validation, so a model is validated on stock situations it never trained on."""
    coll = fdb.db[SITUATIONS_COLLECTION]
    ids = {k: _situation_id(k) for k in keys}
    known = {d["_id"]: d["split"] for d in coll.find({"_id": {"$in": list(ids.values())}}, {"split": 1})}
    out = {}
    for key in keys:  # already in first-appearance order
        sid = ids[key]
        if sid in known:
            out[key] = known[sid]
            continue
        from pymongo import ReturnDocument

        n = coll.find_one_and_update({"_id": "__counter__"}, {"$inc": {"n": 1}}, upsert=True,
                                     return_document=ReturnDocument.AFTER)["n"]
        split = "valid" if n % VALID_EVERY == 2 % VALID_EVERY else "train"
        coll.update_one({"_id": sid}, {"$setOnInsert": {"split": split, "situation": key, "n": n,
                                                        "assigned_at": utcnow()}}, upsert=True)
        # two builds racing: whoever stored first wins, and both use that
        out[key] = coll.find_one({"_id": sid}, {"split": 1})["split"]
    return out


def assign_splits(fdb, labels: list[dict]) -> dict:
    """frame_id -> 'train' | 'valid', stored so it never changes afterwards.

    Imported frames keep their file's split. Every other frame goes where its stock
    situation (``situation_of``) went: whole situations are held out, never random
    frames of a situation the model also trains on (consecutive frames of one
    situation are near-duplicates, and a split of them predicts nothing)."""
    coll = fdb.db[SPLITS_COLLECTION]
    ids = [lab["frame_id"] for lab in labels]
    known = {d["_id"]: d["split"] for d in coll.find({"_id": {"$in": ids}})}
    out = {}
    imported = {}
    for lab in labels:
        if lab.get("split") in ("train", "valid"):  # the imported file's split always holds
            out[lab["frame_id"]] = lab["split"]
            if lab["frame_id"] not in known:
                imported[lab["frame_id"]] = lab["split"]
        elif lab["frame_id"] in known:
            out[lab["frame_id"]] = known[lab["frame_id"]]
    fresh = [lab for lab in sorted(labels, key=lambda d: (d["frame_ts"], str(d["frame_id"])))
             if lab["frame_id"] not in out and lab["frame_id"] not in imported]
    keys = list(dict.fromkeys(situation_of(lab) for lab in fresh))
    by_situation = _situation_splits(fdb, keys) if keys else {}
    new = dict(imported)
    for lab in fresh:
        new[lab["frame_id"]] = by_situation[situation_of(lab)]
    combo_of = {lab["frame_id"]: combination(lab["present"]) for lab in labels}
    if new:
        from pymongo import UpdateOne

        coll.bulk_write([UpdateOne({"_id": frame_id}, {"$setOnInsert": {"split": split, "combination": combo_of[frame_id],
                                                                        "assigned_at": utcnow()}}, upsert=True)
                         for frame_id, split in new.items()], ordered=False)
        # Two builds racing: whoever stored first wins, and both use that.
        stored = {d["_id"]: d["split"] for d in coll.find({"_id": {"$in": list(new)}})}
        for frame_id in new:
            out.setdefault(frame_id, stored[frame_id])
    return out


def _has_slots(label: dict) -> bool:
    """A per-slot label consistent with the label's presence (a manual correction without
    slots, or slots that contradict the presence, leave the frame presence-only)."""
    slots = label.get("slots")
    if not slots or not all(s in slots for s in SLOT_NAMES):
        return False
    types = {t for t in slots.values() if t}
    if not types <= {"BLUE", "RED", "WHITE"}:
        return False
    return all(bool(label["present"].get(c)) == (c.upper() in types) for c in CLASSES)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # all-imgs/ shares the bytes of train-imgs/ and valid-imgs/
    except OSError:
        shutil.copyfile(src, dst)


@dataclass
class BuiltDataset:
    version: str
    path: Path
    counts: dict
    doc: dict
    reused: bool


def _file_name(frame: dict, label: dict) -> str:
    ext = EXTENSIONS.get(frame.get("content_type") or "image/jpeg", ".jpg")
    src = (frame.get("source") or {}) if isinstance(frame.get("source"), dict) else {}
    if frame.get("camera_id") == "import" and src.get("path"):
        stem = Path(src["path"]).name
        return f"{str(frame['_id'])[-8:]}-{stem}"
    ts = label["frame_ts"].strftime("%Y%m%dT%H%M%S%f")[:-3]
    return f"{ts}-{frame['_id']}{ext}"


def labels_of(fdb, labels: list[dict], factory_id: str | None, camera_id: str | None) -> list[dict]:
    """The labels whose frame is ``factory_id``'s (frames stored without one: the default
    factory's) and, when given, ``camera_id``'s: by the label's own ``factory_id`` and
    ``camera_id``; labels stored before they carried them by their frames, looked up by id."""
    from factory_assets.vocabulary import DEFAULT_FACTORY_ID

    def wanted(owner: dict) -> bool:
        return (factory_id is None or (owner.get("factory_id") or DEFAULT_FACTORY_ID) == factory_id) and \
            (camera_id is None or owner.get("camera_id") == camera_id)

    keep = {lab["frame_id"] for lab in labels if "factory_id" in lab and wanted(lab)}
    ids = [lab["frame_id"] for lab in labels if "factory_id" not in lab]
    for lo in range(0, len(ids), FETCH_BATCH * 10):
        for f in fdb.frames.find({"_id": {"$in": ids[lo:lo + FETCH_BATCH * 10]}}, {"factory_id": 1, "camera_id": 1}):
            if wanted(f):
                keep.add(f["_id"])
    return [lab for lab in labels if lab["frame_id"] in keep]


def build_dataset(fdb, root: Path, *, start: datetime | None = None, end: datetime | None = None,
                  days: list[str] | None = None, factory_id: str | None = None,
                  camera_id: str | None = None) -> BuiltDataset:
    """Write the dataset of the labelled frames in [start, end) (all when None); with
    ``days`` (``YYYY-MM-DD``, UTC), only frames captured on those days; with ``factory_id``
    (and ``camera_id``), only that factory's (camera's) frames: a model learns one camera's view."""
    from factory_assets.storage.frames import frame_image_bytes

    # a factory's (camera's) labels: an index range of that factory (labels carry their frame's factory)
    labels = effective_labels(fdb, start, end, factory_id=factory_id, camera_id=camera_id)
    if days is not None:
        wanted = set(days)
        labels = [lab for lab in labels if lab["frame_ts"].astimezone(timezone.utc).strftime("%Y-%m-%d") in wanted]
    if factory_id is None and camera_id is not None:
        labels = labels_of(fdb, labels, None, camera_id)
    if not labels:
        raise DatasetBuildError("no labelled frames in the selected days: label some first "
                                "(auto labels come from labeled_images, or import / label manually)")
    splits = assign_splits(fdb, labels)
    by_split = {s: [lab for lab in labels if splits[lab["frame_id"]] == s] for s in ("train", "valid")}
    for split, labs in by_split.items():
        if not labs:
            raise DatasetBuildError(f"the {split} split would be empty ({len(labels)} labelled frames, "
                                    f"all in the other split): label more frames or more label combinations")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        digest = hashlib.sha256()
        counts: dict = {}
        for split in ("train", "valid"):
            img_dir, annots = staging / f"{split}-imgs", staging / f"{split}-annots"
            img_dir.mkdir()
            annots.mkdir()
            (staging / "all-imgs").mkdir(exist_ok=True)
            rows = []
            slot_rows = []
            labs = by_split[split]
            for lo in range(0, len(labs), FETCH_BATCH):  # bounded memory: images are fetched in batches
                batch = labs[lo:lo + FETCH_BATCH]
                frames = {f["_id"]: f for f in fdb.frames.find({"_id": {"$in": [lab["frame_id"] for lab in batch]}})}
                for lab in batch:
                    frame = frames.get(lab["frame_id"])
                    if frame is None:
                        raise DatasetBuildError(f"label {lab['_id']} ({lab['source']}) refers to frame "
                                                f"{lab['frame_id']}, which does not exist")
                    data = frame_image_bytes(frame)
                    name = _file_name(frame, lab)
                    (img_dir / name).write_bytes(data)
                    _link_or_copy(img_dir / name, staging / "all-imgs" / name)
                    rows.append(LstRow(len(rows) + 1, tuple(int(lab["present"][c]) for c in CLASSES), name))
                    if _has_slots(lab):
                        slot_rows.append((len(rows), lab["slots"], name))
                    digest.update(hashlib.sha256(data).digest())
            text = format_lst(rows)
            (annots / f"{split}.lst").write_text(text, encoding="utf-8")
            digest.update(text.encode())
            if slot_rows:  # the per-slot sidecar; presence-only datasets keep their version
                slots_text = format_slots(slot_rows)
                (annots / f"{split}.slots").write_text(slots_text, encoding="utf-8")
                digest.update(slots_text.encode())
            counts[split] = {"images": len(rows), "with_slots": len(slot_rows),
                             **{c: sum(r.labels[i] for r in rows) for i, c in enumerate(CLASSES)}}
        version = digest.hexdigest()[:16]
        final = root / version
        reused = final.exists()
        if reused:
            shutil.rmtree(staging)
        else:
            staging.rename(final)  # atomic on one filesystem: readers never see a half-written dataset
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    sources: dict = {}
    combos: dict = {}
    for lab in labels:
        sources[lab["source"]] = sources.get(lab["source"], 0) + 1
        combos[combination(lab["present"])] = combos.get(combination(lab["present"]), 0) + 1
    doc = {"version": version, "path": str(final), "counts": counts, "sources": sources, "combinations": combos,
           "days": days, "range": {"start": start, "end": end}, "built_at": utcnow()}
    if factory_id is not None or camera_id is not None:
        doc.update({"factory_id": factory_id, "camera_id": camera_id})
    fdb.datasets.update_one({"_id": version}, {"$set": doc, "$setOnInsert": {"created_at": utcnow()}}, upsert=True)
    return BuiltDataset(version, final, counts, doc, reused)


def dataset_digest(path: Path) -> str:
    """Recompute a written dataset's version from its files (manifests and images),
    exactly as ``build_dataset`` computes it; ``ManifestError`` when a manifest is bad."""
    from factory_assets.datasets.lst import read_lst

    path = Path(path)
    digest = hashlib.sha256()
    for split in ("train", "valid"):
        lst = path / f"{split}-annots" / f"{split}.lst"
        image_dir = path / f"{split}-imgs"
        for row in read_lst(lst, image_dir=image_dir):
            digest.update(hashlib.sha256((image_dir / row.path).read_bytes()).digest())
        digest.update(lst.read_text(encoding="utf-8").encode())
        sidecar = lst.with_suffix(".slots")
        if sidecar.is_file():
            digest.update(sidecar.read_text(encoding="utf-8").encode())
    return digest.hexdigest()[:16]


def record_upload(fdb, version: str, uri: str) -> None:
    fdb.datasets.update_one({"_id": version}, {"$set": {"s3_uri": uri}})


def current_dataset(fdb) -> dict | None:
    """The most recently built dataset (``version``, local ``path``, counts, optional ``s3_uri``)."""
    return fdb.datasets.find_one({}, sort=[("built_at", -1)])


def upload_to_s3(client, local_dir: Path, bucket: str, prefix: str, version: str) -> str:
    """Upload to ``s3://bucket/prefix/.staging-<version>/`` then copy into ``prefix/<version>/``
    and delete the staging keys, so ``prefix/<version>/`` only ever holds a complete dataset."""
    prefix = prefix.strip("/")
    base = f"{prefix}/{version}" if prefix else version
    staging = f"{prefix}/.staging-{version}" if prefix else f".staging-{version}"
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    for p in files:
        client.upload_file(str(p), bucket, f"{staging}/{p.relative_to(local_dir).as_posix()}")
    for p in files:
        rel = p.relative_to(local_dir).as_posix()
        client.copy_object(Bucket=bucket, Key=f"{base}/{rel}", CopySource={"Bucket": bucket, "Key": f"{staging}/{rel}"})
        client.delete_object(Bucket=bucket, Key=f"{staging}/{rel}")
    return f"s3://{bucket}/{base}/"
