"""The `flux-edge plugin run` output shape, built independently of flux_edge/plugins/run.py so
tests can compare the host's records with golden files."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flux_edge.model import ErrorRecord, Measurement


def records_as_json(
    records: Sequence[Measurement | ErrorRecord], indices: Sequence[int]
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, r in zip(indices, records, strict=True):
        if isinstance(r, Measurement):
            out.append(
                {
                    "device": r.device,
                    "name": r.name,
                    "value": r.value,
                    "unit": r.unit,
                    "quality": r.quality,
                    "ts": r.ts,
                }
            )
        else:
            assert isinstance(r, ErrorRecord)
            out.append({"index": i, "device": r.device, "error": r.error})
    return out
