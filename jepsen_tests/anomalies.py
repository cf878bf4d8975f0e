"""What a checker returns: a verdict and the anomalies behind it, ready for JSON.

`CheckResult.valid` is True (nothing found), False (at least one anomaly) or None (the checker
could not decide, e.g. a linearizability search ran out of its step budget). Each anomaly is a
JSON-ready dict with at least a human-readable ``"explain"``; at most `MAX_EXAMPLES` examples of
one kind are kept, and `counts` has the true number.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_EXAMPLES", "CheckResult"]

MAX_EXAMPLES = 8


@dataclass
class CheckResult:
    checker: str
    valid: bool | None = True
    anomalies: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, kind: str, explain: str, **detail: Any) -> None:
        """Record one anomaly of `kind`; makes the result invalid."""
        self.counts[kind] += 1
        self.valid = False
        examples = self.anomalies.setdefault(kind, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append({"explain": explain, **detail})

    def undecided(self, why: str) -> None:
        if self.valid is True:
            self.valid = None
        self.notes.append(why)

    @property
    def kinds(self) -> set[str]:
        return set(self.counts)

    def to_json(self) -> dict[str, Any]:
        return {
            "checker": self.checker,
            "valid": self.valid,
            "anomaly_counts": dict(self.counts),
            "anomalies": self.anomalies,
            "stats": self.stats,
            "notes": self.notes,
        }
