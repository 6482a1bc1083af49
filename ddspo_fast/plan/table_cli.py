"""The command line the planner's committed tables share (``table``, ``fit``,
``published``): ``--write JSON`` and ``--markdown JSON`` (print a written table's README
rows, no estimates)."""
from __future__ import annotations

import argparse
import json


def parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--write", help="write the table as JSON to this path")
    p.add_argument("--markdown", metavar="JSON", help="print the README table of a written "
                   "table and exit (no estimates)")
    return p


def printed_markdown(args, markdown) -> bool:
    """With ``--markdown JSON``: print ``markdown(table)`` and say so (the command ends)."""
    if not args.markdown:
        return False
    with open(args.markdown, encoding="utf-8") as f:
        print(markdown(json.load(f)))
    return True
