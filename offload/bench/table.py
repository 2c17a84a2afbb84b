"""Benchmark tables that read well at any terminal width: the full width when there is one, and at 80 columns
(or a pipe) never a word cut to "…". A table too wide for the width even with every word whole is turned: its
columns become rows, or, when that is still too wide, each row becomes a block of `header: value` lines."""
from __future__ import annotations

from rich.cells import cell_len
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text


def print_table(table: Table, console: Console | None = None) -> None:
    console = console or Console()
    console.print(fit(table, console))


def fit(table: Table, console: Console) -> RenderableType:
    """The table itself when its words fit in the console's width, else its turned form, else one block per
    row."""
    for candidate in (table, _turned(table)):
        if _narrowest(candidate) <= console.width:
            return candidate
    return _blocks(table)


def _plain(cell: RenderableType) -> str:
    return cell.plain if isinstance(cell, Text) else Text.from_markup(cell).plain if isinstance(cell, str) else ""


def _narrowest(table: Table) -> int:
    """The table's width with every column as narrow as its longest word, set as the column's minimum: rich
    wraps between words, and squeezes a column below its longest word only by cutting it."""
    for column in table.columns:
        words = [w for cell in (column.header, *column.cells) for w in _plain(cell).split()]
        column.min_width = max(map(cell_len, words), default=1)
    padding = table.padding[1] + table.padding[3]
    rules = (len(table.columns) - 1 + 2 * table.show_edge) if table.box else 0
    return sum(c.min_width + padding for c in table.columns) + rules


def _turned(table: Table) -> Table:
    """Columns as rows: the first column's cells (the setups) become the headers."""
    columns = [list(c.cells) for c in table.columns]
    turned = Table(title=table.title, caption=table.caption)
    turned.add_column(_plain(table.columns[0].header))
    for cell in columns[0]:
        turned.add_column(_plain(cell), justify="right")
    for column, cells in zip(table.columns[1:], columns[1:]):
        turned.add_row(column.header, *cells)
    return turned


def _blocks(table: Table) -> Group:
    """Each row as its first cell in bold, then one `header: value` line per other column."""
    headers = [_plain(c.header) for c in table.columns]
    rows = list(zip(*(list(c.cells) for c in table.columns)))
    lines: list[RenderableType] = [Text(_plain(table.title or ""), style="italic")] if table.title else []
    for row in rows:
        lines.append(Text(_plain(row[0]), style="bold"))
        lines += [Text(f"  {h}: {_plain(v)}") for h, v in zip(headers[1:], row[1:])]
    return Group(*lines)
