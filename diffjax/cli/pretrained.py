"""`python -m diffjax pretrained list|download|path NAME`: the released checkpoints by name.

    python -m diffjax pretrained list                    # name, resolution, params, size, URL
    python -m diffjax pretrained download adm-imagenet64-cond   # fetch and convert into the cache
    python -m diffjax pretrained path adm-imagenet64-cond       # where the file goes ($DIFFJAX_HOME)
"""
from __future__ import annotations

from diffjax.cli import common
from diffjax.io import pretrained


def build_parser():
    p = common.parser("pretrained", __doc__.split("\n\n")[0])
    p.add_argument("action", choices=("list", "download", "path"))
    p.add_argument("name", nargs="?", help="a pretrained name (download, path)")
    common.flag(p, "no_progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.action == "list":
        rows = [("name", "resolution", "params", "size", "URL"), *pretrained.table()]
        widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
        for row in rows:
            print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)) + "  " + row[4])
        print(f"\ncache: {pretrained.cache_dir()} (set DIFFJAX_HOME to move it)")
        return 0
    if not args.name:
        raise ValueError(f"pretrained {args.action} needs a NAME (python -m diffjax pretrained list)")
    entry = pretrained.lookup(args.name)
    if args.action == "path":
        print(pretrained.cache_dir() / entry.file)
        return 0
    model = pretrained.load_pretrained(args.name, progress=not args.no_progress)
    print(f"{model.describe()}\nin {pretrained.cache_dir() / entry.name}")
    return 0
