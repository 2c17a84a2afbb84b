"""Benchmark tables that read well at any terminal width: the full width when there is one, and at 80 columns
(or a pipe) never a word cut to "…". A table too wide for the width even with every word whole is turned (its
columns become rows) when that fits, else split into several tables that each repeat the first column, else
(a very narrow terminal) written as one block of `header: value` lines per row."""
from __future__ import annotations

from dataclasses import replace

from rich.cells import cell_len
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text


def print_table(table: Table, console: Console | None = None) -> None:
    console = console or Console()
    console.print(fit(table, console.width))


def fit(table: Table, width: int) -> RenderableType:
    for candidate in (table, _turned(table)):
        if _fitted(candidate, width):
            return candidate
    parts = _split(table, width)
    return Group(*parts) if parts else _blocks(table)


def _plain(cell: RenderableType) -> str:
    return cell.plain if isinstance(cell, Text) else Text.from_markup(cell).plain if isinstance(cell, str) else ""


def _fitted(table: Table, width: int) -> bool:
    """Whether the table fits in `width` with no word cut; if it needs less than its natural width, its columns
    get fixed widths: each its longest word, plus a share of the rest in proportion to what it would like (rich's
    own squeezing cuts words when it need not)."""
    texts = [[_plain(cell) for cell in (c.header, *c.cells)] for c in table.columns]
    words = [max((cell_len(w) for t in column for w in t.split()), default=1) for column in texts]
    full = [max((cell_len(line) for t in column for line in t.splitlines()), default=1) for column in texts]
    rules = (len(table.columns) - 1 + 2 * table.show_edge) if table.box else 0
    room = width - rules - len(table.columns) * (table.padding[1] + table.padding[3])
    if sum(words) > room:
        return False
    if sum(full) > room:
        spare, wanted = room - sum(words), [f - w for f, w in zip(full, words)]
        for column, word, want in zip(table.columns, words, wanted):
            column.width = word + spare * want // sum(wanted)
    return True


def _part(table: Table, columns: list[int], title: bool) -> Table:
    part = Table(title=table.title if title else None, caption=table.caption)
    part.columns = [replace(table.columns[i], _index=j) for j, i in enumerate(columns)]
    part.rows = table.rows
    return part


def _split(table: Table, width: int) -> list[Table] | None:
    """The columns after the first in groups as wide as fit beside it; None when one alone does not."""
    groups: list[list[int]] = [[]]
    for i in range(1, len(table.columns)):
        if groups[-1] and not _fitted(_part(table, [0, *groups[-1], i], False), width):
            groups.append([])
        groups[-1].append(i)
    parts = [_part(table, [0, *group], title=n == 0) for n, group in enumerate(groups)]
    return parts if all(_fitted(part, width) for part in parts) else None


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
    lines: list[RenderableType] = [Text(_plain(table.title), style="italic")] if table.title else []
    for row in rows:
        lines.append(Text(_plain(row[0]), style="bold"))
        lines += [Text(f"  {h}: {_plain(v)}") for h, v in zip(headers[1:], row[1:])]
    return Group(*lines)
