"""Write the README's demo table from the demo's JSON file, with the report's own code and rounding.

    python3 docs/readme_demo_table.py            # README.md's table from docs/demo.json
    python3 docs/readme_demo_table.py --check    # exit 1 if README.md's table is not that
    longmem demo && python3 docs/readme_demo_table.py --from report
        # adopt a fresh run: copy its demo.json and loss plot to docs/, then write the table

The table is report.md's results table (``longmem.experiments.DEMO.table_from_json``) without its
wall-time column, which depends on the machine and its load; the README gives wall times apart.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from longmem.experiments import DEMO
from longmem.experiments._report import Table

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- demo table: written by docs/readme_demo_table.py from docs/demo.json; do not edit by hand -->"
END = "<!-- end of demo table -->"
WALL_TIME = "wall time per run"


def render(payload: dict[str, Any]) -> str:
    """The README's table (markdown) from a demo's JSON payload."""
    table = DEMO.table_from_json(payload)
    keep = [i for i, name in enumerate(table.header) if name != WALL_TIME]
    return Table([table.header[i] for i in keep], [[row[i] for i in keep] for row in table.rows]).markdown()


def with_table(readme: str, table: str) -> str:
    """``readme`` with the text between the markers replaced by ``table``."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"README.md lacks the markers {BEGIN!r} ... {END!r}")
    return readme[: start + len(BEGIN)] + "\n\n" + table + "\n\n" + readme[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "demo.json")
    parser.add_argument("--from", dest="source", type=Path, help="a `longmem demo` report folder to adopt")
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if the README differs")
    args = parser.parse_args(argv)
    if args.source is not None:
        shutil.copyfile(args.source / "demo.json", args.json)
        shutil.copyfile(args.source / "loss_curves.png", args.json.parent / "demo_loss.png")
    readme = args.readme.read_text(encoding="utf-8")
    updated = with_table(readme, render(json.loads(args.json.read_text(encoding="utf-8"))))
    if args.check:
        if updated != readme:
            print(
                f"{args.readme}: the demo table is not the one {args.json} gives; run {__file__}",
                file=sys.stderr,
            )
            return 1
        return 0
    args.readme.write_text(updated, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
