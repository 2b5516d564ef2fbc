"""``OUT/summary.csv``: one row per case, rewritten atomically each time a case finishes.

A reader (a spreadsheet, a script polling the file) sees either the previous or the new table, never half of
one; cases not finished yet (or cut off by Ctrl-C) say ``pending``.
"""

from __future__ import annotations

import csv
import io
import threading
from pathlib import Path

from AttentionUNetSegLib import outputs

SUMMARY_NAME = "summary.csv"
COLUMNS = ("case", "input", "status", "volume_ml", "qc", "confidence", "seconds", "error")
OK, ERROR, PENDING = "ok", "error", "pending"


class Summary:
    def __init__(self, path: Path, cases, carried_columns: list[str]):
        self.path = Path(path)
        self.columns = [*COLUMNS, *carried_columns]
        self.rows = {
            case.name: {"case": case.name, "input": case.describe_input(), "status": PENDING, **case.carried}
            for case in cases
        }
        self.unwritten: outputs.WriteError | None = None  # why the file on disk is behind, until a write succeeds
        self._lock = threading.Lock()

    def record_ok(self, case: str, report: dict, save: bool = True) -> None:
        """A finished case, from its report alone, so a rerun that skips it writes the same row."""
        self._record(case, save, status=OK, volume_ml=f"{report['volume_ml']:.2f}", qc=report["qc"],
                     confidence=f"{report['confidence']:.3f}", seconds=f"{report['seconds']:.1f}", error="")

    def record_error(self, case: str, reason: str, seconds: float) -> None:
        self._record(case, True, status=ERROR, volume_ml="", qc="", confidence="", seconds=f"{seconds:.1f}",
                     error=" ".join(reason.split()))  # one line, whatever the exception said

    def count(self, status: str) -> int:
        return sum(row["status"] == status for row in self.rows.values())

    def failed(self) -> list[str]:
        return [name for name, row in self.rows.items() if row["status"] == ERROR]

    def write(self) -> None:
        """Rewrite the file; a failure (a full disk) is a WriteError."""
        with self._lock:
            table = io.StringIO(newline="")
            writer = csv.DictWriter(table, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows.values())
            outputs.write_outputs({self.path: outputs.bytes_writer(table.getvalue().encode("utf-8"))})
            self.unwritten = None

    def _record(self, case: str, save: bool, **values: str) -> None:
        with self._lock:
            self.rows[case].update(values)
        if save:
            self._save()

    def _save(self) -> None:
        """Called as each case ends, in the engine's threads and callbacks, where a raised error would vanish: a
        failure is kept for the batch's closing line instead (and a later write may still succeed)."""
        try:
            self.write()
        except outputs.WriteError as exc:
            self.unwritten = exc
