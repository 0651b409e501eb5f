"""The first stage: find frame files and record each one in the catalog.

Every file gets exactly one row: what it is (the normalised header), or why it cannot
be used. A file already recorded with the same size and modification time is not read
again, so re-running over a night adds nothing; the same bytes under a second name are
recorded as a duplicate of the first and never processed twice.
"""

from __future__ import annotations

import fnmatch
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from astropy.io import fits
from loguru import logger

from observd.catalog import Catalog
from observd.config import Config
from observd.headers import FrameInfo, describe
from observd.rawio import BadFrame, RawFrame, read_raw

__all__ = ["Ingested", "find_frame_files", "ingest_file", "is_frame_name", "in_time_order"]

# Frame types that cannot be used without an exposure time.
_NEEDS_EXPTIME = {"dark", "flat", "darkflat", "light"}


@dataclass
class Ingested:
    """The outcome of recording one file."""

    frame_id: int
    status: str  # "recorded", "rejected" or "duplicate"
    reason: str | None
    info: FrameInfo | None  # None when the header could not be read
    raw: RawFrame | None  # the pixels, for the next stages; None unless recorded now
    new: bool  # False when the catalog already had this file unchanged


def is_frame_name(path: Path, config: Config) -> bool:
    """True for names that are frames; False for temporary names and other files."""
    name = path.name
    lower = name.lower()
    if any(fnmatch.fnmatch(name, pattern) for pattern in config.ingest.ignore):
        return False
    return any(lower.endswith(ext) for ext in config.ingest.extensions)


def find_frame_files(roots: Iterable[Path], config: Config) -> Iterator[Path]:
    """Every frame file under the given files or folders, recursively, in name order.

    Raises
    ------
    FileNotFoundError
        For a root that does not exist.
    """
    for root in roots:
        root = Path(root)
        if root.is_file():
            yield root
            continue
        if not root.is_dir():
            raise FileNotFoundError(f"no such file or folder: {root}")
        for folder, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                path = Path(folder) / name
                if is_frame_name(path, config):
                    yield path


def in_time_order(paths: Iterable[Path], config: Config) -> list[Path]:
    """Paths sorted by observation time (DATE-OBS), as the camera wrote them.

    A batch run must take frames in the order a live night would have, so that
    re-running a night reproduces its masters and stacks. Only headers are read; files
    whose header cannot be read go last, in name order (ingest will say why).
    """
    keyed = []
    for path in paths:
        when = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                header = fits.getheader(path)
            when = _describe(header, path, config).date_obs
        except Exception:  # unreadable: ingest_file records the reason
            pass
        keyed.append((when is None, when.timestamp() if when else 0.0, str(path), path))
    return [item[-1] for item in sorted(keyed)]


def ingest_file(path: str | Path, catalog: Catalog, config: Config) -> Ingested | None:
    """Record one file in the catalog.

    Parameters
    ----------
    path
        The file; stored as an absolute path.
    catalog
        The catalog to write.
    config
        For the site timezone and filter aliases.

    Returns
    -------
    Ingested or None
        None when the file vanished before it could be read.
    """
    path = Path(path).absolute()
    try:
        stat = path.stat()
    except FileNotFoundError:
        logger.warning("{}: vanished before it could be read", path)
        return None
    known = catalog.frame_by_path(path)
    if known and known["size"] == stat.st_size and known["mtime_ns"] == stat.st_mtime_ns:
        return Ingested(known["id"], known["status"], known["reason"], None, None, new=False)

    raw: RawFrame | None = None
    info: FrameInfo | None = None
    try:
        raw = read_raw(path)
    except FileNotFoundError:
        logger.warning("{}: vanished before it could be read", path)
        return None
    except BadFrame as bad:
        status, reason, sha256 = "rejected", bad.reason, bad.sha256
        size = bad.size if bad.size is not None else stat.st_size
        if bad.header is not None:
            info = _describe(bad.header, path, config)
    else:
        info = _describe(raw.header, path, config, raw.data.shape)
        sha256, size = raw.sha256, raw.size
        status, reason = "recorded", _unusable_reason(info)
        if reason:
            status = "rejected"

    duplicate_of = None
    if sha256 is not None and size:
        original = catalog.first_with_hash(sha256, exclude_id=known["id"] if known else None)
        if original is not None and original["path"] != str(path):
            duplicate_of = original["id"]
            status = "duplicate"
            reason = f"same content as {original['path']}"

    row: dict[str, Any] = {
        "path": str(path),
        "size": size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": sha256,
        "status": status,
        "reason": reason,
        "duplicate_of": duplicate_of,
        **(_info_columns(info) if info else {}),
    }
    with catalog.transaction():
        if known:
            catalog.update_frame(known["id"], row)
            frame_id = known["id"]
            catalog.log_event("ingest", "re-read", "file changed on disk", frame_id=frame_id)
        else:
            frame_id = catalog.insert_frame(row)
        details = {"type": info.type, "night": info.night} if info else None
        if info and info.problems:
            details = {**(details or {}), "problems": list(info.problems)}
        catalog.log_event("ingest", status, reason, frame_id=frame_id, details=details)
    if status == "recorded":
        logger.info("{}: {} recorded ({})", path.name, info.type, _summary(info))
    else:
        logger.warning("{}: {}: {}", path.name, status, reason)
    return Ingested(frame_id, status, reason, info, raw if status == "recorded" else None, new=True)


def _describe(header, path: Path, config: Config, shape=None) -> FrameInfo:
    return describe(
        header,
        path,
        timezone=config.site.timezone,
        filter_aliases=config.headers.filter_aliases,
        shape=shape,
    )


def _unusable_reason(info: FrameInfo) -> str | None:
    """Why a readable frame still cannot be used, from its header problems."""
    missing = []
    if info.type == "unknown":
        missing.append("frame type")
    if info.type in _NEEDS_EXPTIME and info.exptime is None:
        missing.append("exposure time")
    if info.date_obs is None:
        missing.append("observation date")
    if not missing:
        return None
    return "; ".join(info.problems) or "unknown " + ", ".join(missing)


def _info_columns(info: FrameInfo) -> dict[str, Any]:
    setup = info.setup
    return {
        "type": info.type,
        "filter": info.filter,
        "exptime": info.exptime,
        "target": info.target,
        "target_slug": info.target_slug,
        "date_obs": info.date_obs.isoformat() if info.date_obs else None,
        "night": info.night,
        "setup": setup.key(),
        "binning": setup.binning,
        "gain": setup.gain,
        "offset": setup.offset,
        "readout": setup.readout,
        "set_temp": setup.set_temp,
        "ccd_temp": info.ccd_temp,
        "nx": setup.shape[1] if setup.shape else None,
        "ny": setup.shape[0] if setup.shape else None,
        "bayer": setup.bayer,
        "telescope": info.telescope,
        "instrument": info.instrument,
        "calstat": info.calstat,
        "pointing_ra": info.pointing[0] if info.pointing else None,
        "pointing_dec": info.pointing[1] if info.pointing else None,
        "pixel_scale": info.pixel_scale,
        "has_wcs": int(info.has_wcs),
        "problems": list(info.problems),
        "sources": dict(info.sources),
    }


def _summary(info: FrameInfo) -> str:
    parts = [info.night or "no night"]
    if info.target:
        parts.append(info.target)
    if info.filter:
        parts.append(info.filter)
    if info.exptime is not None:
        parts.append(f"{info.exptime:g}s")
    return ", ".join(parts)
