"""The morning summary: the night on one page, and the camera's health over the nights.

A reader, like the dome page: it opens the catalog (read-only is enough) and the
products, and writes only ``summary/<night>/index.html`` and ``summary.json`` (atomically,
the page first, so a crash in between leaves an old ``summary.json`` and the summary is
written again). The page is self-contained: plots and thumbnails are embedded as data
URIs, the full-size PNGs and the FITS are linked relative to the page, so it opens from a
file browser with no network.

What the daemon calls (the lead wires it): every minute or so, for the current night and
the one before, ``if summary_due(config, catalog, night): write_summary(config, catalog,
night)``. :func:`summary_due` says yes once the night is over (astronomical dawn from
:func:`night_end`, or no frame for ``[summary] quiet_minutes`` after lights began) and the
catalog holds something newer than the last summary, so late frames rewrite it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter, defaultdict
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
from astropy.io import fits
from loguru import logger

from observd import __version__
from observd.catalog import Catalog
from observd.config import Config
from observd.headers import slugify
from observd.products import Products, atomic_write_bytes
from observd.status import read_daemon_state
from observd.twilight import twilight

__all__ = [
    "format_markdown",
    "night_end",
    "render_html",
    "summary_data",
    "summary_due",
    "write_summary",
]

# Gaussian PSF: noise-equivalent area = 4 pi sigma^2 = pi FWHM^2 / (2 ln 2)
_NEA_PER_FWHM2 = math.pi / (2.0 * math.log(2.0))
_USED = ("stacked",)
_PENDING = ("accepted", "provisional", "recorded")
# frames stacked at a median transparency beyond this factor of the reference's: warn
_REFERENCE_OFF = 1.5


# ------------------------------------------------------------------------------ when


def night_end(config: Config, night: str) -> datetime:
    """When the night is over: astronomical dawn (offline), as an aware UTC datetime.

    The sun's altitude comes from a closed formula (:mod:`observd.twilight`), so nothing
    is downloaded. Without [site] latitude/longitude, or where the sun never gets down
    to ``[summary] dawn_altitude`` (a summer night far north), the night ends at the
    local ``[summary] fallback_dawn`` of the next morning.

    Parameters
    ----------
    config
        The effective configuration ([site], [summary]).
    night
        Local date of the evening, ``YYYY-MM-DD``.
    """
    return _night_bounds(config, night)[1]


def _night_bounds(config: Config, night: str) -> tuple[datetime, datetime]:
    """Dusk and dawn (UTC) at ``summary.dawn_altitude``; where the sun cannot say (no
    site position, or it never gets that low), local 18:00 and ``summary.fallback_dawn``."""
    site = config.site
    dusk = dawn = None
    if site.latitude is not None and site.longitude is not None:
        dusk, dawn = twilight(night, site.latitude, site.longitude, site.timezone,
                              config.summary.dawn_altitude)  # fmt: skip
    evening = date.fromisoformat(night)
    tz = ZoneInfo(site.timezone)
    if dusk is None:
        dusk = datetime.combine(evening, time(18, 0), tz).astimezone(UTC)
    if dawn is None:
        hh, mm = (int(x) for x in config.summary.fallback_dawn.split(":"))
        dawn = datetime.combine(evening + timedelta(days=1), time(hh, mm), tz).astimezone(UTC)
    return dusk, dawn


def _source_stamp(catalog: Catalog, night: str) -> dict[str, Any]:
    """What the summary was made from: changes whenever a frame of the night is touched."""
    n, last = catalog.db.execute(
        "select count(*), max(updated) from frames where night = ?", [night]
    ).fetchone()
    (processed,) = catalog.db.execute(
        "select max(processed) from lights where night = ?", [night]
    ).fetchone()
    return {"frames": int(n), "last_update": max(filter(None, [last, processed]), default=None)}


def summary_due(
    config: Config, catalog: Catalog, night: str, now: datetime | None = None
) -> bool:
    """Whether the summary of ``night`` should be (re)written now.

    True when the catalog holds frames of that night newer than the last summary (or
    there is none yet) and the night is over: past :func:`night_end`, or lights were
    taken and no frame of the night has been touched for ``[summary] quiet_minutes``.

    Parameters
    ----------
    config, catalog
        The configuration and an open catalog (read-only is enough).
    night
        ``YYYY-MM-DD``.
    now
        Aware datetime (default: the current time).
    """
    now = now or datetime.now(UTC)
    stamp = _source_stamp(catalog, night)
    if stamp["frames"] == 0:
        return False
    folder = Products(config.paths.products).summary_dir(night)
    previous = _read_json(folder / "summary.json")
    current = previous is not None and previous.get("source") == stamp
    if current and (folder / "index.html").exists():
        return False
    if now >= night_end(config, night):
        return True
    (lights,) = catalog.db.execute(
        "select count(*) from frames where night = ? and type = 'light'", [night]
    ).fetchone()
    quiet = timedelta(minutes=config.summary.quiet_minutes)
    return bool(lights) and now - _parse(stamp["last_update"]) >= quiet


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _parse(text: str | None) -> datetime:
    if not text:
        return datetime.min.replace(tzinfo=UTC)
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# ------------------------------------------------------------------------------ data


def summary_data(config: Config, catalog: Catalog, night: str) -> dict[str, Any]:
    """Everything the summary shows, as plain JSON-able data.

    Parameters
    ----------
    config
        The effective configuration.
    catalog
        An open catalog (read-only is enough).
    night
        ``YYYY-MM-DD``.

    Returns
    -------
    dict
        ``night``, ``generated``, ``source``, ``dusk``/``dawn``, ``totals``,
        ``targets`` (per target: ``tracking``, ``rgb``, and per filter the stack, frames
        used and rejected with reasons, exposure, FWHM/background series, depth),
        ``masters``, ``camera`` (health table and warnings), ``problems`` (failed files,
        uncalibrated lights, disk, gaps) and ``warnings`` (every warning sentence).
    """
    products = Products(config.paths.products)
    out_dir = products.summary_dir(night)
    frames = catalog.frames("night = ?", [night])
    lights = {row["frame_id"]: row for row in catalog.lights("l.night = ?", [night])}
    targets = {t["id"]: t for t in catalog.targets(night)}
    coadds = {
        (row["target_id"], row["filter"] or ""): row
        for row in catalog.db["coadds"].rows_where("night = ?", [night])
    }
    dusk, dawn = _night_bounds(config, night)
    data: dict[str, Any] = {
        "night": night,
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "observd": __version__,
        "site": {
            "name": config.site.name,
            "timezone": config.site.timezone,
            "latitude": config.site.latitude,
            "longitude": config.site.longitude,
        },
        "dusk": dusk.isoformat(timespec="seconds"),
        "dawn": dawn.isoformat(timespec="seconds"),
        "source": _source_stamp(catalog, night),
        "catalog": str(catalog.path),
    }
    light_frames = [f for f in frames if f["type"] == "light"]
    data["totals"] = {
        "files": len(frames),
        "by_type": dict(Counter(f["type"] or "unknown" for f in frames)),
        "lights": len(light_frames),
        "lights_by_status": dict(Counter(f["status"] for f in light_frames)),
        "exposure_s": sum(f["exptime"] or 0.0 for f in light_frames if f["status"] in _USED),
    }
    data["targets"] = _targets(config, products, out_dir, night, light_frames, lights,
                               targets, coadds)  # fmt: skip
    data["masters"] = _masters(catalog, out_dir, lights.values())
    data["camera"] = _camera(config, catalog, night, {f["setup"] for f in frames if f["setup"]})
    data["problems"] = _problems(config, catalog, night, frames, lights, dusk, dawn)
    data["warnings"] = (
        [w for t in data["targets"] for w in t["warnings"]]
        + data["camera"]["warnings"]
        + data["problems"]["warnings"]
    )
    return _finite(data)


def _finite(value: Any) -> Any:
    """NaN and infinities as null: summary.json must parse in a browser (strict JSON)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _targets(config, products, out_dir, night, light_frames, lights, targets, coadds):
    by_slug: dict[str, int] = {}
    for tid, t in sorted(targets.items(), key=lambda kv: kv[1]["grid_no"], reverse=True):
        by_slug[t["target_slug"]] = tid  # grid 1 wins
    groups: dict[tuple[Any, str], list[dict[str, Any]]] = defaultdict(list)
    for f in light_frames:
        light = lights.get(f["id"])
        tid = light["target_id"] if light and light["target_id"] else None
        if tid is None and f["target_slug"]:
            tid = by_slug.get(f["target_slug"])
        key = tid if tid is not None else (f["target"] or "(no target)")
        groups[(key, f["filter"] or "")].append(f)
    out = []
    names = sorted({k for k, _ in groups}, key=lambda k: _target_name(k, targets))
    zero_points = config.summary.zero_point
    for key in names:
        target = targets.get(key) if isinstance(key, int) else None
        name = _target_name(key, targets)
        entry: dict[str, Any] = {
            "target": name,
            "slug": slugify(name),
            "target_id": target["id"] if target else None,
            "filters": [],
        }
        all_lights = []
        for (k, filt), members in sorted(groups.items(), key=lambda kv: _filter_order(kv[0][1])):
            if k != key:
                continue
            coadd = coadds.get((key, filt)) if target else None
            entry["filters"].append(
                _filter_entry(filt, members, lights, coadd, out_dir, zero_points.get(filt))
            )
            all_lights += [lights[f["id"]] for f in members if f["id"] in lights]
        entry["exposure_s"] = sum(fe["exposure_s"] for fe in entry["filters"])
        entry["warnings"] = [f"{name}: {w}" for fe in entry["filters"] for w in fe["warnings"]]
        entry["tracking"] = _tracking(all_lights)
        rgb = products.rgb(night, name) if target else None
        entry["rgb"] = _rel(rgb, out_dir) if rgb is not None and rgb.exists() else None
        entry["rgb_file"] = str(rgb) if entry["rgb"] else None
        out.append(entry)
    return out


def _target_name(key: Any, targets: dict[int, dict]) -> str:
    return targets[key]["name"] if isinstance(key, int) else str(key)


def _filter_order(filt: str) -> tuple[int, str]:
    order = ["L", "R", "G", "V", "B", "Ha", "OIII", "SII"]
    return (order.index(filt) if filt in order else len(order), filt)


def _filter_entry(filt, members, lights, coadd, out_dir, zero_point) -> dict[str, Any]:
    used, rejected, pending = [], [], []
    series = []
    for f in members:
        light = lights.get(f["id"], {})
        item = {
            "file": Path(f["path"]).name,
            "path": f["path"],
            "date_obs": f["date_obs"],
            "exptime": f["exptime"],
        }
        if f["status"] in _USED:
            used.append({**item, "weight": light.get("weight")})
        elif f["status"] in _PENDING:
            pending.append({**item, "status": f["status"]})
        else:
            rejected.append({**item, "status": f["status"], "reason": f["reason"]})
        if light.get("fwhm") is not None or light.get("background") is not None:
            series.append({
                "date_obs": f["date_obs"],
                "used": f["status"] in _USED,
                "fwhm": light.get("fwhm"),
                "fwhm_arcsec": light.get("fwhm_arcsec"),
                "background": light.get("background"),
                "background_rms": light.get("background_rms"),
                "exptime": f["exptime"],
                "transparency": light.get("transparency"),
            })  # fmt: skip
    entry: dict[str, Any] = {
        "filter": filt,
        "lights": len(members),
        "used": len(used),
        "rejected": len(rejected),
        "pending": len(pending),
        "exposure_s": sum(u["exptime"] or 0.0 for u in used),
        "frames_used": used,
        "frames_rejected": rejected,
        "frames_pending": pending,
        "series": series,
        "fwhm": _stats([s["fwhm"] for s in series if s["used"]]),
        "fwhm_arcsec": _stats([s["fwhm_arcsec"] for s in series if s["used"]]),
        "background": _stats([s["background"] for s in series if s["used"]]),
        "stack": _stack(coadd, out_dir),
    }
    entry["depth"] = _depth(series, entry["stack"], zero_point)
    entry["warnings"] = []
    t = (entry["depth"] or {}).get("transparency")
    if t is not None and not 1 / _REFERENCE_OFF <= t <= _REFERENCE_OFF:
        entry["warnings"].append(
            f"the flux reference of filter {filt or '(none)'} is off: the frames stacked measure "
            f"{t:.2f} x its transparency, so the stack (scaled to it) is {t:.2f} x too "
            f"{'faint' if t > 1 else 'bright'} (a cloudy first frame?)"
        )
    return entry


def _stats(values: list[float | None]) -> dict[str, float] | None:
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return None
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}


def _stack(coadd: dict[str, Any] | None, out_dir: Path) -> dict[str, Any] | None:
    """The final stack: its files (relative to the summary) and what its header says."""
    if not coadd or not coadd.get("fits") or not Path(coadd["fits"]).exists():
        return None
    path = Path(coadd["fits"])
    out: dict[str, Any] = {"fits": _rel(path, out_dir), "fits_file": str(path), "png": None}
    if coadd.get("png") and Path(coadd["png"]).exists():
        out["png"] = _rel(Path(coadd["png"]), out_dir)
        out["png_file"] = coadd["png"]
    try:
        with fits.open(path, memmap=False) as hdul:
            header = hdul[0].header
            image = np.asarray(hdul[0].data, dtype=np.float32)
            expmap = np.asarray(hdul["EXPMAP"].data) if "EXPMAP" in hdul else None
    except (OSError, ValueError, KeyError) as exc:
        out["error"] = f"cannot read {path.name}: {exc}"
        return out
    out.update(
        exptime=header.get("EXPTIME"),
        ncombine=header.get("NCOMBINE"),
        fwhm=header.get("FWHM"),
        bunit=header.get("BUNIT"),
        date_obs=header.get("DATE-OBS"),
        date_end=header.get("DATE-END"),
    )
    if expmap is not None and expmap.shape == image.shape and np.nanmax(expmap) > 0:
        out["noise_measured"] = _stack_noise(image, expmap)
    return out


def _stack_noise(image: np.ndarray, expmap: np.ndarray) -> float | None:
    """Background rms of the stack where it is deepest (sep's mesh, sources masked).

    Resampling correlates neighbouring pixels, so this per-pixel figure is a little
    below the noise a point source sees; the frames' combination is the one used.
    """
    import sep

    deep = (expmap >= 0.9 * np.nanmax(expmap)) & np.isfinite(image)
    if deep.sum() < 1024:
        return None
    ys, xs = np.nonzero(deep)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    sub = np.ascontiguousarray(np.where(deep[box], image[box], 0.0), dtype=np.float32)
    try:
        return float(sep.Background(sub, mask=~deep[box]).globalrms)
    except Exception as exc:  # sep raises its own errors on odd images
        logger.warning("summary: no background rms of a stack: {}", exc)
        return None


def _depth(series, stack, zero_point) -> dict[str, Any] | None:
    """Background noise (ADU/s per pixel) and the 5-sigma point-source limit.

    Each used frame's noise in ADU/s is its ``background_rms / exptime``; the stack's is
    their inverse-variance combination (what an optimally weighted mean reaches). A point
    source at the 5-sigma limit gives 5 x noise x sqrt(NEA), with NEA = pi FWHM^2 /
    (2 ln 2) the noise-equivalent area of a Gaussian PSF (background-limited, PSF fit).
    """
    used = [s for s in series if s["used"] and s["background_rms"] and s["exptime"]]
    if not used:
        return None
    n = np.array([s["background_rms"] / s["exptime"] for s in used], dtype=float)
    # the coadd divides each frame by its transparency (BUNIT: ADU/s at the reference's)
    scale = np.array([s.get("transparency") or 1.0 for s in used], dtype=float)
    stack_noise = float(1.0 / np.sqrt(np.sum((scale / n) ** 2)))
    fwhm = (stack or {}).get("fwhm") or _stats([s["fwhm"] for s in series if s["used"]])
    fwhm = fwhm["median"] if isinstance(fwhm, dict) else fwhm
    out: dict[str, Any] = {
        "frame_noise_adu_s": float(np.median(n)),
        "transparency": float(np.median(scale)),
        "noise_adu_s": stack_noise,
        "noise_measured_adu_s": (stack or {}).get("noise_measured"),
        "fwhm_px": fwhm,
        "zero_point": zero_point,
    }
    if fwhm:
        nea = _NEA_PER_FWHM2 * fwhm**2
        out["limit_adu_s"] = 5.0 * stack_noise * math.sqrt(nea)
        out["frame_limit_adu_s"] = 5.0 * float(np.median(n / scale)) * math.sqrt(nea)
        if zero_point is not None:
            out["limit_mag"] = zero_point - 2.5 * math.log10(out["limit_adu_s"])
            out["frame_limit_mag"] = zero_point - 2.5 * math.log10(out["frame_limit_adu_s"])
    return out


def _tracking(lights: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Drift (px/min) and field rotation (deg/h) from the lights' offsets on the grid.

    Per pier side: the drift is the median rate between consecutive lights (the mount
    drifts between re-centrings, which show as a few large jumps that the median ignores;
    dithers add noise to each pair). The field rotation has no jumps: Theil-Sen slope (the
    median of all pairwise slopes). The flip is the first light measured on the other side.
    """
    pts = sorted(
        (
            (_parse(li["date_obs"]), li)
            for li in lights
            if li.get("dx") is not None and li.get("date_obs")
        ),
        key=lambda p: p[0],
    )
    if not pts:
        return None
    t0 = pts[0][0]
    rows = []
    for t, li in pts:
        rot = float(li.get("rotation") or 0.0)
        flipped = bool(li.get("flipped"))
        rows.append({
            "date_obs": li["date_obs"],
            "minutes": (t - t0).total_seconds() / 60.0,
            "dx": li["dx"],
            "dy": li["dy"],
            "rotation": rot,
            "rotation_field": _wrap(rot - 180.0) if flipped else _wrap(rot),
            "flipped": flipped,
        })  # fmt: skip
    flip = next((r["date_obs"] for r in rows if r["flipped"] != rows[0]["flipped"]), None)
    segments = []
    for side in (False, True):
        seg = [r for r in rows if r["flipped"] == side]
        if not seg:
            continue
        m = np.array([r["minutes"] for r in seg])
        vx, vy, jumps = _drift(m, np.array([r["dx"] for r in seg]),
                               np.array([r["dy"] for r in seg]))  # fmt: skip
        vr = _theil_sen(m, np.array([r["rotation_field"] for r in seg]))
        segments.append({
            "pier": "flipped" if side else "before flip",
            "frames": len(seg),
            "drift_x_px_min": vx,
            "drift_y_px_min": vy,
            "drift_px_min": math.hypot(vx, vy) if vx is not None and vy is not None else None,
            "recentred": jumps,
            "rotation_deg_h": vr * 60.0 if vr is not None else None,
        })  # fmt: skip
    drifts = [s["drift_px_min"] for s in segments if s["drift_px_min"] is not None]
    rots = [s["rotation_deg_h"] for s in segments if s["rotation_deg_h"] is not None]
    return {
        "points": rows,
        "flip": flip,
        "segments": segments,
        "drift_px_min": float(np.average(drifts, weights=[s["frames"] for s in segments
                                                         if s["drift_px_min"] is not None]))
        if drifts else None,
        "rotation_deg_h": float(np.median(rots)) if rots else None,
    }  # fmt: skip


def _wrap(deg: float) -> float:
    return (deg + 180.0) % 360.0 - 180.0


def _drift(
    minutes: np.ndarray, x: np.ndarray, y: np.ndarray
) -> tuple[float | None, float | None, int]:
    """Drift (px/min in x and y) of consecutive lights, and the re-centrings seen.

    A step between consecutive lights that departs from the median drift by more than
    max(5 px, 4 robust sigma of the steps) is a re-centring (or a pointing jump). The
    drift is then the Theil-Sen slope within each run between re-centrings (all pairs of
    a run, pooled): long baselines beat the dither and the 1 s rounding of DATE-OBS that
    make single steps noisy, and the jumps never enter.
    """
    dt, sx, sy = np.diff(minutes), np.diff(x), np.diff(y)
    valid = dt > 0.01  # a Seestar writes a light every 11 s
    if not valid.any():
        return None, None, 0
    jump = np.zeros(dt.size, dtype=bool)
    for _ in range(3):
        use = valid & ~jump
        vx = float(np.median(sx[use] / dt[use]))
        vy = float(np.median(sy[use] / dt[use]))
        resid = np.hypot(sx - vx * dt, sy - vy * dt)
        scale = 1.4826 * float(np.median(resid[use]))
        new = valid & (resid > max(5.0, 4.0 * scale))
        if (valid & ~new).sum() < 1 or np.array_equal(new, jump):
            break
        jump = new
    run = np.concatenate([[0], np.cumsum(jump)])  # run number of each light
    i, j = np.triu_indices(minutes.size, k=1)
    same = (run[i] == run[j]) & (minutes[j] - minutes[i] > 0.01)
    if same.any():
        base = minutes[j][same] - minutes[i][same]
        vx = float(np.median((x[j][same] - x[i][same]) / base))
        vy = float(np.median((y[j][same] - y[i][same]) / base))
    return vx, vy, int(jump.sum())


def _theil_sen(x: np.ndarray, y: np.ndarray) -> float | None:
    i, j = np.triu_indices(x.size, k=1)
    dx = x[j] - x[i]
    ok = dx > 0.01  # minutes apart
    if not ok.any():
        return None
    return float(np.median((y[j] - y[i])[ok] / dx[ok]))


def _rel(path: Path, out_dir: Path) -> str:
    return Path(os.path.relpath(path, out_dir)).as_posix()


def _masters(catalog: Catalog, out_dir: Path, lights) -> list[dict[str, Any]]:
    uses: Counter[int] = Counter()
    for light in lights:
        for key in ("bias_id", "dark_id", "flat_id"):
            if light.get(key):
                uses[light[key]] += 1
    out = []
    for master_id, n in sorted(uses.items()):
        m = catalog.master(master_id)
        path = Path(m["path"])
        out.append({
            "id": master_id,
            "kind": m["kind"],
            "night": m["night"],
            "setup": m["setup"],
            "filter": m["filter"],
            "exptime": m["exptime"],
            "version": m["version"],
            "status": m["status"],
            "n_frames": m["n_frames"],
            "lights": n,
            "file": _rel(path, out_dir) if path.exists() else None,
        })  # fmt: skip
    return sorted(out, key=lambda m: (m["kind"], m["filter"] or "", m["exptime"] or 0))


# ----------------------------------------------------------------------- camera health


def _camera(config: Config, catalog: Catalog, night: str, setups: set[str]) -> dict[str, Any]:
    """The health table of this night against the earlier ones, per setup, and warnings."""
    s = config.summary
    cal = config.calibration
    out: dict[str, Any] = {"setups": [], "warnings": []}
    for row in catalog.camera_health(night):
        setups.add(row["setup"])
    for setup in sorted(setups):
        history = [
            h for h in catalog.camera_health() if h["setup"] == setup and h["night"] <= night
        ][-(s.history_nights + 1):]
        this = next((h for h in history if h["night"] == night), None)
        earlier = [h for h in history if h["night"] < night]
        rows = [_health_row(h) for h in history]
        entry: dict[str, Any] = {"setup": setup, "history": rows, "warnings": []}
        if this is not None:
            warn = entry["warnings"]
            for filt, change in sorted(_health_row(this)["flat_change"].items()):
                worst = max(change["peak"], change["rms"])
                level = ("alarm" if worst > cal.flat_change_alarm
                         else "warn" if worst > cal.flat_change_warn else None)  # fmt: skip
                if level:
                    warn.append(
                        f"{'ALARM' if level == 'alarm' else 'warning'}: flat {filt or '(none)'} "
                        f"changed by {100 * change['peak']:.1f} % (peak; rms "
                        f"{100 * change['rms']:.2f} %) since {change['previous_night']} "
                        f"(warn above {100 * cal.flat_change_warn:g} %, alarm above "
                        f"{100 * cal.flat_change_alarm:g} %)"
                    )
            hot = _new_hot_pixels(catalog, night, setup)
            entry["hot_pixels"] = hot
            if hot is not None:
                limit = max(s.new_hot_pixels_warn, s.new_hot_pixels_fraction * hot["previous"])
                hot["limit"] = limit
                if hot["new"] > limit:
                    warn.append(
                        f"warning: {hot['new']} new hot pixels since {hot['previous_night']} "
                        f"({hot['previous']} then, {hot['now']} now; warn above {limit:g})"
                    )
            rate_now = this.get("dark_current_e") or this.get("dark_current_adu")
            key = "dark_current_e" if this.get("dark_current_e") else "dark_current_adu"
            before = next((h for h in reversed(earlier) if h.get(key)), None)
            if rate_now and before:
                ratio = rate_now / before[key]
                entry["dark_current_ratio"] = {"ratio": ratio, "previous_night": before["night"]}
                if ratio > s.dark_current_warn:
                    unit = "e-/s" if key.endswith("_e") else "ADU/s"
                    warn.append(
                        f"warning: dark current up {ratio:.2f} x since {before['night']} "
                        f"({before[key]:.4f} -> {rate_now:.4f} {unit}/px; warn above "
                        f"{s.dark_current_warn:g} x)"
                    )
        out["setups"].append(entry)
        out["warnings"] += [f"camera {setup}: {w}" for w in entry["warnings"]]
    return out


def _health_row(h: dict[str, Any]) -> dict[str, Any]:
    keys = ("night", "bias_level", "bias_col_rms", "read_noise_adu", "read_noise_e", "gain",
            "dark_current_adu", "dark_current_e", "hot_pixels")  # fmt: skip
    row = {k: h.get(k) for k in keys}
    row["flat_change"] = {
        filt: {
            "peak": e["change_peak"],
            "rms": e["change_rms"],
            "status": e.get("change_status"),
            "previous_night": e.get("previous_night"),
        }
        for filt, e in (h.get("flats") or {}).items()
        if "change_peak" in e
    }
    row["vignetting"] = {f: e.get("vignetting") for f, e in (h.get("flats") or {}).items()}
    return row


def _new_hot_pixels(catalog: Catalog, night: str, setup: str) -> dict[str, Any] | None:
    """Hot pixels of this night's dark-rate map that the previous night's map lacked."""
    now = catalog.masters(
        "kind = 'darkrate' and setup = ? and night = ? and status = 'current'", [setup, night]
    )
    before = catalog.db.execute(
        "select id from masters where kind = 'darkrate' and setup = ? and night < ? and "
        "status = 'current' order by night desc limit 1",
        [setup, night],
    ).fetchone()
    if not now or before is None:
        return None
    previous = catalog.master(before[0])
    try:
        a = fits.getdata(now[-1]["path"], "HOTPIX") > 0
        b = fits.getdata(previous["path"], "HOTPIX") > 0
    except (OSError, KeyError) as exc:
        logger.warning("summary: cannot compare hot-pixel maps: {}", exc)
        return None
    if a.shape != b.shape:
        return None
    return {
        "new": int(np.count_nonzero(a & ~b)),
        "gone": int(np.count_nonzero(b & ~a)),
        "now": int(a.sum()),
        "previous": int(b.sum()),
        "previous_night": previous["night"],
    }


# ---------------------------------------------------------------------------- problems


def _problems(config, catalog, night, frames, lights, dusk, dawn) -> dict[str, Any]:
    warnings_: list[str] = []
    noon = datetime.combine(date.fromisoformat(night), time(12, 0), ZoneInfo(config.site.timezone))
    lo, hi = noon.astimezone(UTC).isoformat(), (noon + timedelta(days=1)).astimezone(UTC)
    unnamed = catalog.frames("night is null and first_seen >= ? and first_seen < ?",
                             [lo, hi.isoformat()])  # fmt: skip
    failed = [
        {
            "file": Path(f["path"]).name,
            "path": f["path"],
            "type": f["type"],
            "status": f["status"],
            "reason": f["reason"],
        }
        for f in [*frames, *unnamed]
        if f["status"] in ("failed", "rejected", "duplicate") and f["type"] != "light"
        or f["status"] == "failed"
    ]
    uncalibrated = []
    for f in frames:
        if f["type"] != "light":
            continue
        light = lights.get(f["id"])
        missing = list(((light or {}).get("calibration") or {}).get("missing") or [])
        if f["status"] == "waiting":
            missing = missing or [f["reason"] or "waiting"]
        if missing:
            uncalibrated.append({"file": Path(f["path"]).name, "path": f["path"],
                                 "status": f["status"], "missing": missing})  # fmt: skip
    if uncalibrated:
        warnings_.append(f"{len(uncalibrated)} lights without a full calibration")
    disk = _disk(config)
    for d in disk:
        if d["free_gb"] is not None and d["free_gb"] < config.summary.disk_warn_gb:
            warnings_.append(f"disk: only {d['free_gb']:.1f} GB free on {d['path']}")
    gaps = _gaps(frames, dusk, dawn, config.summary.gap_minutes)
    for g in gaps["gaps"]:
        warnings_.append(
            f"gap: no frame for {g['minutes']:.0f} min ({g['start'][11:16]}-{g['end'][11:16]} UTC)"
            " while the sky was dark"
        )
    if failed:
        warnings_.append(f"{len(failed)} files failed or were not usable (see Problems)")
    return {"failed": failed, "uncalibrated": uncalibrated, "disk": disk, "gaps": gaps,
            "warnings": warnings_}  # fmt: skip


def _disk(config: Config) -> list[dict[str, Any]]:
    """Free space where products and frames live (and what the daemon last saw)."""
    out = []
    seen = set()
    for label, path in [("products", config.paths.products),
                        *(("camera", p) for p in config.paths.incoming)]:  # fmt: skip
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            usage = shutil.disk_usage(probe)
            dev = os.stat(probe).st_dev
        except OSError as exc:
            out.append({"what": label, "path": str(path), "free_gb": None, "error": str(exc)})
            continue
        if dev in seen:
            continue
        seen.add(dev)
        out.append({
            "what": label,
            "path": str(path),
            "free_gb": usage.free / 1e9,
            "total_gb": usage.total / 1e9,
            "used_fraction": 1.0 - usage.free / usage.total if usage.total else None,
        })  # fmt: skip
    # what the daemon saw (the camera share may be mounted only on its side)
    state = read_daemon_state(config.paths.products)
    shown = {d["path"] for d in out}
    for path, free in (state.get("disk_free") or {}).items():
        if path not in shown and isinstance(free, int | float):
            out.append({"what": f"seen by the daemon at {state.get('updated')}", "path": path,
                        "free_gb": free / 1e9, "total_gb": None})  # fmt: skip
    return out


def _gaps(frames, dusk: datetime, dawn: datetime, gap_minutes: float) -> dict[str, Any]:
    """Silences between consecutive frames while the sky was dark.

    A gap is the time from one frame's end (DATE-OBS + exposure; when the catalog first
    saw it if there is no DATE-OBS) to the next one's start, clipped to dusk..dawn,
    longer than ``gap_minutes`` and than 3 x the median interval between lights.
    """
    spans = []
    for f in frames:
        start = _parse(f["date_obs"] or f["first_seen"])
        spans.append((start, start + timedelta(seconds=f["exptime"] or 0.0), f["type"]))
    spans.sort(key=lambda s: s[0])
    lights = [s[0] for s in spans if s[2] == "light"]
    cadence = (
        float(np.median(np.diff([t.timestamp() for t in lights]))) / 60.0
        if len(lights) >= 3 else None
    )  # fmt: skip
    threshold = max(gap_minutes, 3.0 * cadence) if cadence else gap_minutes
    gaps = []
    for (_, end, _), (start, _, _) in zip(spans, spans[1:], strict=False):
        a, b = max(end, dusk), min(start, dawn)
        minutes = (b - a).total_seconds() / 60.0
        if minutes > threshold:
            gaps.append({"start": a.isoformat(timespec="seconds"),
                         "end": b.isoformat(timespec="seconds"), "minutes": minutes})  # fmt: skip
    return {"cadence_minutes": cadence, "threshold_minutes": threshold, "gaps": gaps}


# ----------------------------------------------------------------------------- writing


def write_summary(config: Config, catalog: Catalog, night: str) -> Path:
    """Write ``summary/<night>/index.html`` and ``summary.json``; returns the page's path.

    Both are written atomically, the page first: ``summary.json`` (which
    :func:`summary_due` compares with the catalog) is only replaced once the page is.
    """
    data = summary_data(config, catalog, night)
    folder = Products(config.paths.products).summary_dir(night)
    page = render_html(data)
    index = atomic_write_bytes(folder / "index.html", page.encode("utf-8"))
    text = json.dumps(data, allow_nan=False, default=str) + "\n"
    atomic_write_bytes(folder / "summary.json", text.encode("utf-8"))
    logger.info("summary of {} -> {} ({} warnings)", night, index, len(data["warnings"]))
    return index


def render_html(data: dict[str, Any]) -> str:
    """The summary as one self-contained HTML page (plots and thumbnails embedded)."""
    from observd import summary_html  # matplotlib is imported only to draw

    return summary_html.render(data)


def format_markdown(data: dict[str, Any]) -> str:
    """The summary as Markdown, for pasting into an observing log."""
    from observd import summary_html

    return summary_html.markdown(data)
