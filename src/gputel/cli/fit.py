"""Tables that fit the terminal: a table where every cell fits on one line, else stacked blocks.

A rich table squeezed under its width cuts cells (``52.2/…``) or breaks a GPU name over five
lines. Neither is acceptable for figures people copy into tickets, so a table is printed only
when every cell fits whole; otherwise each row becomes a block: a heading (the first column),
then ``label value`` pairs packed onto lines without ever splitting a pair. The JSON output is
the place for everything at once; this is for reading.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

#: Between two ``label value`` pairs of a stacked block.
PAIR_GAP = "   "
INDENT = "  "


def _table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def fits(console: Console, table: Table) -> bool:
    """Whether every cell of ``table`` (all columns ``no_wrap``) fits whole in the width."""
    # Measured without the console's limit (a measurement is clamped to the width it is given).
    measured = Measurement.get(console, console.options.update_width(1_000_000), table)
    return measured.maximum <= console.width


def stacked(width: int, columns: Sequence[str], row: Sequence[str]) -> list[str]:
    """One row as a heading and packed ``label value`` lines no wider than ``width`` (a pair
    longer than a line stands alone and the terminal wraps it)."""
    lines = [f"{columns[0]} {row[0]}".rstrip()]
    current = ""
    for label, value in zip(columns[1:], row[1:], strict=True):
        if not value:
            continue
        pair = f"{label}: {value}"
        if current and len(INDENT) + len(current) + len(PAIR_GAP) + len(pair) > width:
            lines.append(INDENT + current)
            current = pair
        else:
            current = f"{current}{PAIR_GAP}{pair}" if current else pair
    if current:
        lines.append(INDENT + current)
    return lines


def print_rows(
    console: Console,
    title: str | None,
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
) -> None:
    """A table when it fits the console's width, else one stacked block per row."""
    table = _table(title, columns, rows)
    if fits(console, table):
        console.print(table)
        return
    if title:
        console.print(Text(title, style="italic"))
    for row in rows:
        for line in stacked(console.width, columns, row):
            console.print(Text(line), soft_wrap=False)
