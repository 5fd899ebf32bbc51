"""Render every measured table of the documentation from the committed results.

    python benchmarks/render_docs.py            # rewrite every table from its JSON
    python benchmarks/render_docs.py --check    # change nothing; exit 1 naming each stale table

Each entry of TABLES is one results file under docs/results/ (written by the
benchmark named in the file's "command"), the function of benchmarks/renderers.py
that turns it into markdown, and where the markdown goes: a whole page, or the
lines between two marker comments of a page,

    <!-- begin rendered: NAME -->
    ...
    <!-- end rendered: NAME -->

so that prose around a table stays hand-written.  A new result is one line
here (and a renderer, if none of the existing ones fits).
tests/test_render_docs.py fails when a rendered table differs from its JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import renderers  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Table:
    results: str                     # the JSON, relative to the repository root
    render: Callable[[dict], str]    # renderers.<function>
    target: str                      # the markdown file it goes to
    region: str | None = None        # None: the whole file; else the marker region's NAME


TABLES = (
    Table("docs/results/seed_study.json", renderers.seed_study_page, "docs/seed_study.md"),
    Table("docs/results/seed_study.json", renderers.seed_study_summary, "README.md", "results"),
    Table("docs/results/prune_signals.json", renderers.prune_signals_page,
          "docs/prune_signals.md"),
    Table("docs/results/teacher_plateau.json", renderers.teacher_plateau_table,
          "docs/method.md", "teacher_plateau"),
    Table("docs/results/finetune_plateau.json", renderers.finetune_plateau_table,
          "docs/method.md", "finetune_plateau"),
    Table("docs/results/finetune_shorter.json", renderers.finetune_shorter_table,
          "docs/method.md", "finetune_shorter"),
    Table("docs/results/bundle.json", renderers.bundle_table, "docs/performance.md", "bundle"),
    Table("docs/results/bundle_memory.json", renderers.bundle_memory_table,
          "docs/performance.md", "bundle_memory"),
    Table("docs/results/training_speed.json", renderers.training_speed_table,
          "docs/performance.md", "training_speed"),
    Table("docs/results/latency_prediction.json", renderers.latency_prediction_table,
          "docs/performance.md", "latency_prediction"),
    Table("docs/results/eval_suite.json", renderers.eval_suite_page, "docs/eval_suite.md"),
)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- begin rendered: {name} -->", f"<!-- end rendered: {name} -->"


class RenderError(Exception):
    pass


def rendered(table: Table, current: str | None) -> str:
    """The text `table.target` should hold, given what it holds now."""
    with open(os.path.join(ROOT, table.results), encoding="utf-8") as f:
        text = table.render(json.load(f))
    if table.region is None:
        return text
    begin, end = _markers(table.region)
    if current is None:
        raise RenderError(f"{table.target}: no such file (it needs the markers {begin} ... {end})")
    pattern = re.compile("^" + re.escape(begin) + r"\n.*?^" + re.escape(end) + "$", re.S | re.M)
    if len(pattern.findall(current)) != 1:
        raise RenderError(f"{table.target}: needs exactly one pair of lines {begin} ... {end}")
    return pattern.sub(lambda _: f"{begin}\n{text}{end}", current)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None


def render_all(check: bool = False, tables=TABLES) -> list[str]:
    """Rewrites every target (or, with check, only compares); returns the
    targets that differed from their JSON, as 'target (results)'."""
    stale = []
    # Several tables can go to one file: apply them in turn to its text.
    texts: dict[str, str | None] = {}
    for table in tables:
        path = os.path.join(ROOT, table.target)
        if path not in texts:
            texts[path] = _read(path)
        new = rendered(table, texts[path])
        if new != texts[path]:
            region = f"#{table.region}" if table.region else ""
            stale.append(f"{table.target}{region} ({table.results})")
        texts[path] = new
    if not check:
        for path, text in texts.items():
            if text != _read(path):
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
    return stale


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if a table differs from its JSON")
    args = parser.parse_args(argv)
    try:
        stale = render_all(check=args.check)
    except (RenderError, OSError, KeyError, ValueError) as e:
        print(f"render_docs.py: error: {e}", file=sys.stderr)
        return 2
    for entry in stale:
        print(("stale: " if args.check else "rendered: ") + entry)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
