"""The TrueTime interval: a closed range of nanoseconds that contains true time.

All times in K2 are `int` nanoseconds since the Unix epoch (`Timestamp`). Python ints do not
overflow, so arithmetic on them needs no saturation, and a timestamp fits a protobuf fixed64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

Timestamp: TypeAlias = int
"""Nanoseconds since the Unix epoch, UTC. The low 12 bits of an oracle-issued timestamp name
the oracle and coordinator slot that issued it (see `truetime.oracle`)."""


@dataclass(frozen=True, slots=True)
class TTInterval:
    """`[earliest, latest]`, both ends inclusive: true time was inside when the interval was read.

    The guarantee holds only while the clock's real error stays within the uncertainty used to
    build the interval (see the HAZARD notes in `truetime.truetime`).
    """

    earliest: Timestamp
    latest: Timestamp

    def __post_init__(self) -> None:
        if self.earliest > self.latest:
            raise ValueError(
                f"TTInterval needs earliest <= latest, got earliest={self.earliest} "
                f"latest={self.latest}"
            )

    @property
    def width(self) -> int:
        """`latest - earliest`: twice the uncertainty the interval was built with."""
        return self.latest - self.earliest

    def contains(self, t: Timestamp) -> bool:
        """Whether `t` lies in the interval, ends included."""
        return self.earliest <= t <= self.latest
