"""The data report file: every count, per rule, and the first bad rows, for users who want the detail
that the resource's status has no room for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deeptune_trainer.data.pipeline import PreparedData


def data_report(prepared: PreparedData) -> dict[str, Any]:
    stats = prepared.cleaning
    return {
        "summary": prepared.report.to_wire(),
        "style": prepared.style,
        "hubCommits": prepared.hub_commits,
        "rules": {
            "tooShort": stats.too_short,
            "tooLong": stats.too_long,
            "degenerate": stats.degenerate,
            "piiDropped": stats.pii_dropped,
            "piiRedactedRows": stats.pii_redacted,
            "exactDuplicates": stats.exact_duplicates,
            "nearDuplicates": stats.near_duplicates,
            "nearDuplicateComparisons": stats.near_comparisons,
        },
        "nearDuplicateExamples": [
            {
                "removed": {"source": ex.source, "line": ex.line},
                "nearlyRepeats": {"source": ex.kept_source, "line": ex.kept_line},
                "similarity": ex.similarity,
                "preview": ex.preview,
            }
            for ex in stats.near_examples
        ],
        "piiFound": dict(sorted(stats.pii_found.items())),
        "augmentedBy": prepared.augmented_by,
        "backTranslationRejected": prepared.augmentation_rejected,
        "embeddingCheckDropped": prepared.meaning_drifted,
        "badRows": [
            {"source": row.source, row.unit: row.line, "reason": row.reason} for row in prepared.bad_rows
        ],
    }


def write_data_report(prepared: PreparedData, path: str | Path) -> None:
    """Write the report as UTF-8 JSON (Chinese reasons stay readable: no \\u escapes)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(
        json.dumps(data_report(prepared), ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
