"""Tables that stay readable in an 80-column terminal: one line per row, cut with an
ellipsis, the least useful columns left out when even that does not fit; `--wide`
shows every column in full however long the lines get.

rich's own layout squeezes every column in proportion, down to nothing: a header broken
mid-word, an address folded over three lines, no-wrap columns gone. So the widths are
decided here and handed to rich fixed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

#: Spaces between two columns (one of padding, one of the box's column separator).
GAP = 2
#: Printed under a table that lost text to the terminal's width.
CUT_NOTE = "some text was cut to fit the terminal: --wide shows it all"

Cell = str | Text | int | float | None


@dataclass(frozen=True)
class Column:
    """One column: how far it may shrink, and whether it may be left out."""

    header: str
    #: The header used when the table is tight ("oldest" for "oldest pending").
    short: str | None = None
    #: Cut with an ellipsis down to this width; 0: never cut (ids, counts, times).
    min_width: int = 0
    #: Never wider than this, unless --wide.
    max_width: int | None = None
    #: Left out when the table does not fit otherwise: the highest goes first; 0: never.
    drop: int = 0
    justify: Literal["left", "right"] = "left"


@dataclass(frozen=True)
class Layout:
    """Which columns are shown, with which header, how wide."""

    shown: tuple[int, ...]
    headers: tuple[str, ...]
    widths: tuple[int, ...]
    #: Some text is shorter than it is, or a column was left out.
    cut: bool

    @property
    def width(self) -> int:
        return sum(self.widths) + GAP * max(0, len(self.widths) - 1)


def _text(cell: Cell) -> Text:
    if isinstance(cell, Text):
        return cell
    # Caller data (subjects, server replies) is never read as rich markup, and a line
    # break inside a cell would make its row two lines.
    return Text("" if cell is None else " ".join(str(cell).split()))


def layout(
    columns: Sequence[Column], rows: Sequence[Sequence[Text]], *, width: int, wide: bool
) -> Layout:
    """Fit the columns into `width` cells (or show all of them in full when `wide`).

    Tight tables first use their short headers, then leave out droppable columns, the
    highest `drop` first, until every column fits at its narrowest; the space left is
    handed out one cell at a time to the narrowest column that is still cut, so short
    texts come out whole before long ones grow.
    """
    contents = [
        max((cell_len(row[i].plain) for row in rows), default=0) for i in range(len(columns))
    ]
    shown = list(range(len(columns)))
    short = False
    while True:
        headers = [
            (columns[i].short or columns[i].header) if short else columns[i].header for i in shown
        ]
        natural = [max(cell_len(h), contents[i]) for h, i in zip(headers, shown, strict=True)]
        if wide:
            return Layout(tuple(shown), tuple(headers), tuple(natural), cut=False)
        caps, lows = [], []
        for header, full, i in zip(headers, natural, shown, strict=True):
            column = columns[i]
            cap = (
                full
                if column.max_width is None
                else min(full, max(column.max_width, cell_len(header)))
            )
            low = (
                cap if column.min_width == 0 else min(cap, max(column.min_width, cell_len(header)))
            )
            caps.append(cap)
            lows.append(low)
        needed = sum(lows) + GAP * (len(shown) - 1)
        if needed > width:
            if not short and any(columns[i].short for i in shown):
                short = True
                continue
            droppable = [i for i in shown if columns[i].drop > 0]
            if droppable:
                shown.remove(max(droppable, key=lambda i: (columns[i].drop, i)))
                continue
        widths = list(lows)
        spare = width - needed
        while spare > 0:
            growing = [k for k in range(len(widths)) if widths[k] < caps[k]]
            if not growing:
                break
            widths[min(growing, key=lambda k: widths[k])] += 1
            spare -= 1
        cut = len(shown) < len(columns) or any(
            w < full for w, full in zip(widths, natural, strict=True)
        )
        return Layout(tuple(shown), tuple(headers), tuple(widths), cut=cut)


def build(
    title: str | None,
    columns: Sequence[str | Column],
    rows: Iterable[Sequence[Cell]],
    *,
    width: int,
    wide: bool = False,
    cut_note: str | None = CUT_NOTE,
) -> tuple[Table, int]:
    """A rich Table of fixed column widths, and how wide it is."""
    specs = [c if isinstance(c, Column) else Column(c) for c in columns]
    cells = [[_text(cell) for cell in row] for row in rows]
    fit = layout(specs, cells, width=width, wide=wide)
    table = Table(
        title=Text(title) if title else None,
        title_justify="left",
        caption=Text(cut_note, style="dim") if fit.cut and cut_note else None,
        caption_justify="left",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1, 0, 0),
        expand=False,
    )
    for i, header, w in zip(fit.shown, fit.headers, fit.widths, strict=True):
        table.add_column(
            header,
            width=w,
            no_wrap=True,
            overflow="ellipsis",
            justify=specs[i].justify,
        )
    for row in cells:
        table.add_row(*(row[i] for i in fit.shown))
    return table, fit.width


def show(
    console: Console,
    title: str | None,
    columns: Sequence[str | Column],
    rows: Iterable[Sequence[Cell]],
    *,
    wide: bool = False,
) -> None:
    """Print a table on `console`; wider than the terminal only with `wide` (or when
    even the narrowest layout does not fit), as long lines rather than folded ones."""
    table, width = build(title, columns, rows, width=console.width, wide=wide)
    if width <= console.width:
        console.print(table)
        return
    # rich would squeeze the table back into the terminal: print it on a console as
    # wide as the table, writing to the same place.
    Console(
        file=console.file,
        width=width,
        force_terminal=console.is_terminal,
        no_color=console.no_color,
        highlight=False,
    ).print(table)
