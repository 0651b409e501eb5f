"""What the dome page shows, gathered read-only from the catalog and the products.

Everything here reads: the catalog opened read-only, product files and the daemon's state
file. The page (HTML), the JSON API and the live-update signature are all built from the
dicts returned here, so the three always agree.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import Counter
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from observd.catalog import Catalog
from observd.products import Products
from observd.status import FRAME_KEYS, STATE_FILE, read_daemon_state

__all__ = [
    "QUALITY_KEYS",
    "daemon_health",
    "frames_data",
    "night_view",
    "parse_night",
    "product_url",
    "signature",
    "sky_noise",
]

#: The daemon counts as down when its state file is older than this (HELPERS contract).

#: Per-light quality numbers (``lights`` table) added to each frame of ``/api/frames``.
QUALITY_KEYS = (
    "fwhm",
    "fwhm_arcsec",
    "elongation",
    "n_stars",
    "background",
    "background_rms",
    "transparency",
    "align_method",
    "align_rms",
    "verdict",
    "weight",
)

_NIGHT_RE = re.compile(r"\d{4}-\d{2}-\d{2}")


def parse_night(text: str) -> str:
    """A night ``YYYY-MM-DD`` that is a real date; ValueError with the reason otherwise."""
    if not _NIGHT_RE.fullmatch(text):
        raise ValueError(f"night must be YYYY-MM-DD, got {text[:40]!r}")
    try:
        date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"night {text!r} is not a date") from None
    return text


def product_url(root: Path, path: str | os.PathLike[str] | None) -> str | None:
    """``/products/<relative path>?v=<mtime>`` for a file under the products folder.

    None when the file is missing or lies outside the products folder. The version
    parameter makes a browser fetch a product again exactly when it changed.
    """
    if not path:
        return None
    p = Path(path)
    try:
        rel = p.relative_to(root)
    except ValueError:
        return None
    try:
        mtime = p.stat().st_mtime_ns
    except OSError:
        return None
    return f"/products/{rel.as_posix()}?v={mtime}"


# ----------------------------------------------------------------------------- daemon


def daemon_health(products: Products, now: datetime | None = None) -> dict[str, Any]:
    """The daemon's state (:func:`observd.status.read_daemon_state`) as the page shows
    it: ``up``, a plain reason when it is down, and the watcher's mode."""
    state = read_daemon_state(products.root, now)
    reason = None if state["alive"] else (
        f"daemon {state['reason']}" if state["reason"].startswith("state unreadable")
        else f"daemon not running ({state['reason']})"
    )  # fmt: skip
    out: dict[str, Any] = {**state, "up": state["alive"], "reason": reason}
    watcher = state.get("watcher") or {}
    modes = sorted({str(r.get("mode")) for r in watcher.get("roots", []) if r.get("mode")})
    out["watcher_mode"] = ", ".join(modes) or None
    return out


# ----------------------------------------------------------------------------- stacks

_depth_cache: dict[tuple[str, int], float | None] = {}
_depth_lock = threading.Lock()


def sky_noise(path: str, *, measure: bool = True) -> float | None:
    """Background noise of a coadd (its BUNIT per pixel), cached until the file changes.

    With ``measure=False`` only a cached value is returned (None when not measured yet):
    the page does not wait for a 4k FITS to be read, the warm-up thread measures it.
    """
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        return None
    key = (path, mtime)
    with _depth_lock:
        if key in _depth_cache or not measure:
            return _depth_cache.get(key)
    from observd.render import sky_stats

    try:
        with fits.open(path, memmap=True) as hdul:
            _, sigma = sky_stats(np.asarray(hdul[0].data, dtype=np.float32))
        value = float(sigma) if np.isfinite(sigma) else None
    except (OSError, ValueError, TypeError, IndexError):
        value = None
    with _depth_lock:
        for old in [k for k in _depth_cache if k[0] == path]:
            del _depth_cache[old]
        _depth_cache[key] = value
    return value


def _stacks(catalog: Catalog, root: Path, night: str, measure: bool) -> list[dict[str, Any]]:
    rows = catalog.db["coadds"].rows_where("night = ?", [night], order_by="target, filter")
    out = []
    for row in rows:
        stats = json.loads(row["stats"]) if row.get("stats") else {}
        out.append(
            {
                "id": row["id"],
                "target": row["target"],
                "filter": row["filter"],
                "frames": row["n_frames"],
                "exptime": stats.get("exptime"),
                "fwhm": stats.get("fwhm"),
                "warming_up": stats.get("warming_up"),
                "rejected_fraction": stats.get("rejected_fraction"),
                "noise": sky_noise(row["fits"], measure=measure) if row.get("fits") else None,
                "fits_path": row.get("fits"),
                "png_path": row.get("png"),
                "png": product_url(root, row.get("png")),
                "fits": product_url(root, row.get("fits")),
                "updated": row.get("updated"),
            }
        )
    return out


def _composites(products: Products, night: str, names: list[str]) -> list[dict[str, Any]]:
    """The night's colour pictures, named like their stacks' targets."""
    out = []
    for name in sorted(set(names)):
        png = products.rgb(night, name)
        url = product_url(products.root, png)
        if url:
            out.append({"target": name, "png": url, "png_path": str(png)})
    return out


# ----------------------------------------------------------------------------- frames


def frames_data(catalog: Catalog, night: str) -> list[dict[str, Any]]:
    """Every frame of the night: the ``observd status`` keys plus the quality numbers."""
    lights = {row["frame_id"]: row for row in catalog.lights("l.night = ?", [night])}
    out = []
    for row in catalog.frames("night = ?", [night]):
        entry = {"id": row["id"], **{k: row.get(k) for k in FRAME_KEYS}}
        light = lights.get(row["id"], {})
        entry.update({k: light.get(k) for k in QUALITY_KEYS})
        out.append(entry)
    return out


def _latest(catalog: Catalog, night: str) -> dict[str, Any] | None:
    """The frame that came in last (by when observd saw it), with its light row."""
    rows = catalog.frames("night = ?", [night], order_by="first_seen desc, id desc")
    if not rows:
        return None
    frame = rows[0]
    light = catalog.lights("l.frame_id = ?", [frame["id"]])
    out = {"id": frame["id"], **{k: frame.get(k) for k in FRAME_KEYS}}
    out["name"] = Path(frame["path"]).name
    out["first_seen"] = frame["first_seen"]
    out["light"] = light[0] if light else None
    out["image"] = f"/frame/{frame['id']}.jpg" if frame["status"] not in ("failed",) else None
    if frame["type"] in (None, "unknown") or frame["status"] == "duplicate":
        out["image"] = None
    return out


# ----------------------------------------------------------------------------- the view


def night_view(
    catalog: Catalog, products: Products, night: str | None, *, measure: bool = True
) -> dict[str, Any]:
    """Everything the page shows for one night (None: the latest night in the catalog).

    ``measure=False`` leaves the stacks' noise None until :func:`sky_noise` has measured
    it (the page stays fast; the warm-up thread measures).
    """
    nights = catalog.nights()
    night = night or (nights[-1] if nights else None)
    view: dict[str, Any] = {"night": night, "nights": nights}
    if night is None:
        view.update(counts={}, frames=[], stacks=[], composites=[], masters=[], camera=[],
                    warnings=[], latest=None)  # fmt: skip
        return view
    frames = frames_data(catalog, night)
    counts = Counter(f"{f['type'] or 'unknown'} {f['status']}" for f in frames)
    masters = catalog.masters("night = ? and status = 'current'", [night])
    stacks = _stacks(catalog, products.root, night, measure)
    camera = catalog.camera_health(night)
    warnings = [f"{row['setup']}: {w}" for row in camera for w in (row.get("warnings") or [])]
    view.update(
        counts=dict(sorted(counts.items())),
        totals=dict(Counter(f["status"] for f in frames)),
        frames=frames,
        latest=_latest(catalog, night),
        stacks=stacks,
        composites=_composites(products, night, [s["target"] for s in stacks]),
        masters=[
            {
                k: m.get(k)
                for k in (
                    "id",
                    "kind",
                    "setup",
                    "filter",
                    "exptime",
                    "version",
                    "n_frames",
                    "used",
                    "created",
                    "stats",
                )
            }  # fmt: skip
            for m in masters
        ],
        camera=camera,
        warnings=warnings,
    )
    return view


def signature(catalog_path: Path, products: Products, night: str | None) -> tuple:
    """Something that changes whenever what the page shows may have changed.

    The catalog's files (main and WAL) by size and mtime, the daemon's state file, and
    every PNG of the night's stacks (the colour composite is written after the catalog).
    Cheap enough to poll twice a second.
    """
    parts: list[Any] = []
    for p in (catalog_path, Path(f"{catalog_path}-wal"), products.state_dir() / STATE_FILE):
        try:
            st = p.stat()
            parts.append((st.st_mtime_ns, st.st_size))
        except OSError:
            parts.append(None)
    if night:
        folder = products.root / "stacks" / night
        try:
            for png in sorted(folder.glob("*/*.png")):
                parts.append((png.name, png.stat().st_mtime_ns))
        except OSError:
            pass
    return tuple(parts)
