"""`python -m training.pretrained list | download NAME [--dir DIR]`: the released checkpoints."""

from __future__ import annotations

import sys

from ..errors import run_cli
from ..params import Parser
from . import cache_dir, download, load_registry

LIST_COLUMNS = ("name", "arch", "role", "teacher", "data", "top-1", "note")


def _cells(ckpt) -> tuple[str, ...]:
    flags = (["DOUBTFUL"] if ckpt.doubtful else []) + ([] if ckpt.url else ["NO LINK"])
    note = ": ".join(filter(None, [", ".join(flags), ckpt.note]))
    return ckpt.name, ckpt.arch, ckpt.role, ckpt.teacher or "-", ckpt.data or "-", ckpt.imagenet_top1, note


def format_table(rows) -> str:
    table = [LIST_COLUMNS, *(_cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(LIST_COLUMNS) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(line, widths)), line[-1]]).rstrip() for line in table)


def build_parser() -> Parser:
    p = Parser(prog="python -m training.pretrained", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print the registry: name, arch, role, teacher, data, ImageNet top-1, note")
    d = sub.add_parser("download", help="download a checkpoint (resumes an interrupted transfer)")
    d.add_argument("name", help="a registry name (python -m training.pretrained list)")
    d.add_argument("--dir", default=None, help=f"destination folder (default: the cache, now {cache_dir()})")
    d.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a try gives up")
    d.add_argument("--attempts", type=int, default=3, help="tries, each resuming the previous one's bytes")
    d.add_argument("--allow-doubtful", action="store_true",
                   help="fetch a row marked doubtful (to inspect it; training refuses it by name)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        print(format_table(load_registry().values()))
        return 0
    path = download(args.name, args.dir, timeout=args.timeout, attempts=args.attempts,
                    progress=not args.no_progress, allow_doubtful=args.allow_doubtful)
    print(f"{args.name}: {path}")
    return 0


def main(argv=None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
