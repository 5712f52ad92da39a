"""Markdown pieces shared by the benchmark's reports."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable


@dataclass(frozen=True)
class Spread:
    """A median with the min and max it was taken over (one run's passes)."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        values = list(values)
        return cls(statistics.median(values), min(values), max(values))

    @classmethod
    def paired(cls, ours: Iterable[float], theirs: Iterable[float]) -> Spread:
        """Of the ratios of pass ``i`` of one path to pass ``i`` of the other."""
        return cls.of(a / b for a, b in zip(ours, theirs, strict=True))

    def __str__(self) -> str:
        return f"{self.median:.2f} ({self.low:.2f}-{self.high:.2f})"


def table(header: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    """A markdown table."""
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
