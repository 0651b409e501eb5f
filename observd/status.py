"""What the catalog holds, as data (``--json``) and as a table for a terminal."""

from __future__ import annotations

from collections import Counter
from typing import Any

from observd.catalog import SCHEMA_VERSION, Catalog

__all__ = ["status_data", "format_status", "FRAME_KEYS"]

# The keys every entry of ``frames`` carries (a contract: scripts rely on them).
FRAME_KEYS = (
    "path",
    "type",
    "filter",
    "exptime",
    "target",
    "night",
    "status",
    "reason",
    "date_obs",
    "setup",
    "duplicate_of",
    "problems",
)


def status_data(catalog: Catalog, night: str | None = None) -> dict[str, Any]:
    """Counts per night, type, filter, exposure and target, and every frame.

    Parameters
    ----------
    catalog
        An open catalog (read-only is enough).
    night
        Only this night (``YYYY-MM-DD``); None for all.
    """
    rows = catalog.frames("night = ?", [night]) if night else catalog.frames()
    groups: Counter[tuple] = Counter()
    by_status: dict[tuple, Counter[str]] = {}
    for row in rows:
        key = (row["night"], row["type"], row["filter"], row["exptime"], row["target"])
        groups[key] += 1
        by_status.setdefault(key, Counter())[row["status"]] += 1
    counts = [
        {
            "night": k[0],
            "type": k[1],
            "filter": k[2],
            "exptime": k[3],
            "target": k[4],
            "frames": n,
            "by_status": dict(by_status[k]),
        }
        for k, n in sorted(groups.items(), key=lambda kv: tuple(_sortable(v) for v in kv[0]))
    ]
    return {
        "catalog": str(catalog.path),
        "schema_version": SCHEMA_VERSION,
        "night": night,
        "totals": dict(Counter(r["status"] for r in rows)),
        "counts": counts,
        "frames": [{key: row.get(key) for key in FRAME_KEYS} for row in rows],
    }


def _sortable(value: Any) -> tuple[int, Any]:
    return (1, "") if value is None else (0, value)


def format_status(data: dict[str, Any]) -> str:
    """A plain-text report for the terminal."""
    lines = [f"catalog {data['catalog']}"]
    totals = data["totals"]
    if not data["frames"]:
        lines.append("no frames" + (f" for night {data['night']}" if data["night"] else ""))
        return "\n".join(lines)
    lines.append(
        f"{len(data['frames'])} files: "
        + ", ".join(f"{n} {status}" for status, n in sorted(totals.items()))
    )
    header = ("night", "type", "filter", "exptime", "target", "files", "status")
    table = [header]
    for c in data["counts"]:
        table.append(
            (
                c["night"] or "-",
                c["type"] or "-",
                c["filter"] or "-",
                "-" if c["exptime"] is None else f"{c['exptime']:g}s",
                c["target"] or "-",
                str(c["frames"]),
                ", ".join(f"{n} {s}" for s, n in sorted(c["by_status"].items())),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines.append("")
    for row in table:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    bad = [f for f in data["frames"] if f["status"] in ("rejected", "failed", "duplicate")]
    if bad:
        lines.append("")
        lines.append("not used:")
        for f in bad:
            lines.append(f"  {f['status']:<9} {f['path']}")
            lines.append(f"            {f['reason']}")
    return "\n".join(lines)
