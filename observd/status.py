"""What the catalog holds, as data (``--json``) and as a table for a terminal."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from observd.catalog import SCHEMA_VERSION, Catalog
from observd.products import Products

__all__ = [
    "DAEMON_STALE_SECONDS",
    "FRAME_KEYS",
    "STATE_FILE",
    "camera_data",
    "format_camera",
    "format_status",
    "read_daemon_state",
    "status_data",
]

STATE_FILE = "daemon.json"
"""Under ``Products.state_dir()``: what ``observd run`` is doing, for its readers."""

DAEMON_STALE_SECONDS = 15.0
"""A state file older than this means the daemon is gone (it rewrites it every 2 s)."""

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


def read_daemon_state(products: str | Path, now: datetime | None = None) -> dict[str, Any]:
    """The daemon's state file with ``alive``, ``age_seconds`` and, when it is down,
    ``reason`` ("no state file", "state unreadable: ...", "stopped", "state file stale").

    Down when the file is missing or unreadable, says ``stopped``, or was last updated
    more than :data:`DAEMON_STALE_SECONDS` ago; the dome page, ``observd status`` and the
    summary all read it here.
    """
    path = Products(products).state_dir() / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return {"alive": False, "age_seconds": None, "reason": "no state file"}
    except (OSError, ValueError) as exc:
        return {"alive": False, "age_seconds": None, "reason": f"state unreadable: {exc}"}
    try:
        updated = datetime.fromisoformat(str(state.get("updated")))
        if updated.tzinfo is None:
            updated = updated.replace(tzinfo=UTC)
        age: float | None = round(((now or datetime.now(UTC)) - updated).total_seconds(), 1)
    except ValueError:
        age = None
    reason = (
        "stopped" if state.get("state") == "stopped"
        else "state file stale" if age is None or age > DAEMON_STALE_SECONDS
        else None
    )  # fmt: skip
    return {**state, "alive": reason is None, "age_seconds": age, "reason": reason}


def _daemon_line(state: dict[str, Any]) -> str:
    """One line on the daemon, from :func:`read_daemon_state`."""
    if "state" not in state:
        return f"daemon  never ran with these products ({state['reason']})"
    if not state["alive"]:
        return f"daemon  not running (last seen {state['updated'][:19]} UTC, {state['state']})"
    event = state.get("last_event") or {}
    last = f"; last: {Path(event['path']).name} {event['what']}" if event else ""
    return (
        f"daemon  running, pid {state['pid']}, {state['processed']} files since "
        f"{state['started'][:19]} UTC, queue {state['queue']}{last}"
    )


def _sortable(value: Any) -> tuple[int, Any]:
    return (1, "") if value is None else (0, value)


def format_status(data: dict[str, Any]) -> str:
    """A plain-text report for the terminal."""
    lines = [f"catalog {data['catalog']}"]
    if "daemon" in data:
        lines.append(_daemon_line(data["daemon"]))
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
    lines += ["", *_table(table)]
    bad = [f for f in data["frames"] if f["status"] in ("rejected", "failed", "duplicate")]
    if bad:
        lines.append("")
        lines.append("not used:")
        for f in bad:
            lines.append(f"  {f['status']:<9} {f['path']}")
            lines.append(f"            {f['reason']}")
    return "\n".join(lines)


# camera-health columns shown by `observd camera`: (key, heading, format)
_HEALTH_COLUMNS = (
    ("bias_level", "bias ADU", "{:.1f}"),
    ("bias_col_rms", "col rms", "{:.2f}"),
    ("read_noise_e", "RN e-", "{:.2f}"),
    ("read_noise_adu", "RN ADU", "{:.2f}"),
    ("gain", "gain e-/ADU", "{:.3f}"),
    ("dark_current_e", "dark e-/s", "{:.4f}"),
    ("hot_pixels", "hot px", "{:d}"),
)


def camera_data(catalog: Catalog, night: str | None = None) -> dict[str, Any]:
    """Camera health per night and setup, and the current masters."""
    masters = catalog.masters("status = 'current'" + (" and night = ?" if night else ""),
                              [night] if night else None)  # fmt: skip
    return {
        "catalog": str(catalog.path),
        "health": catalog.camera_health(night),
        "masters": [
            {
                k: m[k]
                for k in (
                    "kind",
                    "night",
                    "setup",
                    "filter",
                    "exptime",
                    "version",
                    "n_frames",
                    "current_path",
                    "stats",
                )
            }  # fmt: skip
            for m in masters
        ],
    }


def format_camera(data: dict[str, Any]) -> str:
    """Camera health and masters as a terminal report."""
    lines = [f"catalog {data['catalog']}"]
    if not data["health"]:
        return "\n".join([*lines, "no calibration frames yet"])
    table = [("night", "setup", *(h for _, h, _ in _HEALTH_COLUMNS))]
    for row in data["health"]:
        cells = [row["night"], row["setup"]]
        for key, _, fmt in _HEALTH_COLUMNS:
            value = row.get(key)
            cells.append("-" if value is None else fmt.format(value))
        table.append(tuple(cells))
    lines += ["", *_table(table)]
    for row in data["health"]:
        for filt, entry in sorted((row.get("flats") or {}).items()):
            vignetting = 100 * entry["vignetting"]
            text = f"  flat {filt or '(none)'} {row['night']}: vignetting {vignetting:.1f} %"
            if "change_peak" in entry:
                peak, rms = 100 * entry["change_peak"], 100 * entry["change_rms"]
                text += (
                    f", change since {entry['previous_night']}: peak {peak:.2f} %"
                    f" rms {rms:.2f} % ({entry['change_status']})"
                )
            lines.append(text)
        for warning in row.get("warnings") or []:
            lines.append(f"  WARNING {row['night']}: {warning}")
    lines += ["", "current masters:"]
    for m in data["masters"]:
        what = (
            m["kind"]
            + (f" {m['exptime']:g}s" if m["exptime"] else "")
            + (f" {m['filter']}" if m["filter"] else "")
        )
        lines.append(
            f"  {m['night']}  {what:<14} v{m['version']:<3} {m['n_frames']:>3} frames"
            f"  {m['current_path']}"
        )
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
