"""``factory-assets dataset import|build|autolabel`` and ``factory-assets label``."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone


def _day(text: str) -> datetime:
    from factory_assets.vocabulary.clock import parse_day

    return parse_day(text)


def _range(args) -> tuple[datetime | None, datetime | None]:
    start = _day(args.from_day) if args.from_day else None
    end = _day(args.to_day) + timedelta(days=1) if args.to_day else None
    return start, end


def _import(args) -> int:
    from factory_assets.datasets.importer import import_dataset
    from factory_assets.storage.mongo import connect

    s = import_dataset(connect(), args.dir)
    print(json.dumps({"frames_new": s.frames_new, "frames_existing": s.frames_existing, "labels": s.labels,
                      "rows_by_split": s.by_split}))
    return 0


def _autolabel(args) -> int:
    from factory_assets.datasets.autolabel import auto_label
    from factory_assets.storage.mongo import connect

    start, end = _range(args)
    s = auto_label(connect(), start or datetime(2000, 1, 1, tzinfo=timezone.utc),
                   end or datetime.now(timezone.utc) + timedelta(days=1),
                   window_s=args.window, margin_s=args.margin)
    print(json.dumps(s.__dict__))
    return 0


def _build(args) -> int:
    from factory_assets import config
    from factory_assets.datasets.manifests import build_dataset
    from factory_assets.storage.mongo import connect

    start, end = _range(args)
    built = build_dataset(connect(), args.out or config.factory_home() / "datasets", start=start, end=end)
    print(json.dumps({"version": built.version, "path": str(built.path), "counts": built.counts,
                      "reused": built.reused}))
    return 0


def _label(args) -> int:
    from factory_assets.datasets.labels import label_from_csv, label_manually, parse_present
    from factory_assets.storage.mongo import connect

    fdb = connect()
    if args.csv:
        if args.frame_id:
            raise ValueError("give a FRAME_ID or --csv FILE, not both")
        print(f"labelled {label_from_csv(fdb, args.csv, user=args.user)} frames from {args.csv}")
        return 0
    if not args.frame_id:
        raise ValueError("give a FRAME_ID (with --present or --empty) or --csv FILE")
    doc = label_manually(fdb, args.frame_id, parse_present(args.present, args.empty), user=args.user)
    shown = ", ".join(c for c, v in doc["present"].items() if v) or "empty"
    print(f"frame {args.frame_id}: {shown} (manual)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("dataset", help="labelled datasets: import the original layout, auto-label, build manifests")
    actions = p.add_subparsers(dest="action", required=True)
    q = actions.add_parser("import", help="import DIR (train-imgs/, valid-imgs/, *-annots/*.lst) as frames + labels")
    q.add_argument("dir")
    q.set_defaults(func=_import)
    for name, func, helptext in (("autolabel", _autolabel, "label frames from the controller's f/i/stock reports"),
                                 ("build", _build, "write train/valid .lst manifests and images")):
        q = actions.add_parser(name, help=helptext)
        q.add_argument("--from", dest="from_day", metavar="YYYY-MM-DD")
        q.add_argument("--to", dest="to_day", metavar="YYYY-MM-DD")
        if name == "autolabel":
            q.add_argument("--window", type=float, default=None,
                           help="max age of the stock report in force (s; default: any age)")
            q.add_argument("--margin", type=float, default=2.0, help="no stock change within this many s")
        else:
            q.add_argument("--out", help="dataset root (default .factory/datasets)")
        q.set_defaults(func=func)

    lab = sub.add_parser("label", help="label a frame by hand (beats imported and automatic labels)")
    lab.add_argument("frame_id", nargs="?")
    lab.add_argument("--present", metavar="COLOURS", help="e.g. blue,red")
    lab.add_argument("--empty", action="store_true", help="no workpiece in the rack")
    lab.add_argument("--csv", metavar="FILE", help="frame_id,blue,red,white (0/1) or frame_id,present")
    lab.add_argument("--user", default=None)
    lab.set_defaults(func=_label)
