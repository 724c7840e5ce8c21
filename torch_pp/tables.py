"""Plain-text tables, for the plan, ``doctor`` and the benchmarks."""

from __future__ import annotations


def table(head: list[str], rows: list[list]) -> list[str]:
    """The lines of a left-aligned table: header, a rule, then one line per row."""
    rows = [[str(x) for x in row] for row in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]
