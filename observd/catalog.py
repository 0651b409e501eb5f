"""The SQLite catalog: every frame seen, every decision and why.

This is the one module that speaks SQL. The schema lives in ``MIGRATIONS``: each entry
takes the database from version i to i+1 and the version is kept in
``PRAGMA user_version``, so an old catalog is upgraded in place on open and a catalog
from a newer observd is refused rather than damaged. WAL mode lets the dome page and
``observd status`` read while the pipeline worker writes.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import sqlite_utils

__all__ = ["Catalog", "CatalogError", "SCHEMA_VERSION", "json_text", "utcnow"]


class CatalogError(RuntimeError):
    """The catalog cannot be opened or is from an incompatible observd."""


def utcnow() -> str:
    """UTC now as ISO 8601 with microseconds: the catalog's only time format."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _v1(db: sqlite_utils.Database) -> None:
    db["frames"].create(
        {
            "id": int,
            "path": str,
            "size": int,
            "mtime_ns": int,
            "sha256": str,
            "first_seen": str,
            "updated": str,
            "status": str,
            "reason": str,
            "duplicate_of": int,
            # the normalised header (headers.FrameInfo)
            "type": str,
            "filter": str,
            "exptime": float,
            "target": str,
            "target_slug": str,
            "date_obs": str,
            "night": str,
            "setup": str,
            "binning": str,
            "gain": float,
            "offset": float,
            "readout": str,
            "set_temp": float,
            "ccd_temp": float,
            "nx": int,
            "ny": int,
            "bayer": str,
            "telescope": str,
            "instrument": str,
            "calstat": str,
            "has_wcs": int,
            "problems": str,  # JSON list of header problems
            "sources": str,  # JSON: where each fact came from
        },
        pk="id",
        not_null=["path", "first_seen", "updated", "status"],
        foreign_keys=[("duplicate_of", "frames", "id")],
    )
    db["frames"].create_index(["path"], unique=True)
    db["frames"].create_index(["sha256"])
    db["frames"].create_index(["night", "type"])
    db["frames"].create_index(["status"])
    db["events"].create(
        {
            "id": int,
            "time": str,
            "frame_id": int,
            "stage": str,  # who decided
            "action": str,  # what was decided
            "reason": str,  # why
            "details": str,  # JSON, numbers behind the decision
        },
        pk="id",
        not_null=["time", "stage", "action"],
        foreign_keys=[("frame_id", "frames", "id")],
    )
    db["events"].create_index(["frame_id"])
    db["events"].create_index(["time"])


def _v2(db: sqlite_utils.Database) -> None:
    """Master calibrations (one row per version) and camera health per night."""
    db["frames"].add_column("master_key", str)  # calibration frames: the master they feed
    db["frames"].create_index(["master_key"])
    db["masters"].create(
        {
            "id": int,
            "kind": str,  # bias, dark, darkrate, flat, darkflat
            "night": str,
            "setup": str,
            "filter": str,
            "exptime": float,
            "master_key": str,
            "version": int,
            "status": str,  # current, superseded
            "path": str,  # the file of this version (under masters/<night>/versions/)
            "current_path": str,  # the contract name that holds the current version
            "n_frames": int,
            "inputs": str,  # JSON: frame ids folded in
            "depends": str,  # JSON: master ids it was made with (bias for a dark, ...)
            "stats": str,  # JSON
            "used": int,  # lights calibrated with this version
            "created": str,
        },
        pk="id",
        not_null=["kind", "night", "setup", "master_key", "version", "status", "created"],
        defaults={"used": 0},
    )
    db["masters"].create_index(["master_key", "version"], unique=True)
    db["masters"].create_index(["kind", "setup", "status"])
    db["camera"].create(
        {
            "night": str,
            "setup": str,
            "updated": str,
            "bias_level": float,
            "bias_row_rms": float,
            "bias_col_rms": float,
            "read_noise_adu": float,
            "read_noise_e": float,
            "gain": float,
            "gain_error": float,
            "dark_current_e": float,
            "dark_current_adu": float,
            "hot_pixels": int,
            "flats": str,  # JSON: filter -> vignetting, change against the previous night
            "warnings": str,  # JSON list of plain sentences
        },
        pk=("night", "setup"),
    )


def _v3(db: sqlite_utils.Database) -> None:
    """Target grids and the measurements of every processed light."""
    db["frames"].add_column("pointing_ra", float)
    db["frames"].add_column("pointing_dec", float)
    db["frames"].add_column("pixel_scale", float)  # arcsec/px from the header, if it says
    db["targets"].create(
        {
            "id": int,
            "night": str,
            "target": str,
            "target_slug": str,
            "grid_no": int,  # 1, then 2, 3... after a pointing jump
            "name": str,  # display name: "M 51", "M 51 #2"
            "grid": str,  # JSON: register.Grid.to_dict()
            "pointing_ra": float,
            "pointing_dec": float,
            "reference_frame": int,
            "filter_refs": str,  # JSON: filter -> {"frame_id", "flux": per grid star}
            "created": str,
        },
        pk="id",
        not_null=["night", "target", "target_slug", "grid_no", "grid", "created"],
    )
    db["targets"].create_index(["night", "target_slug", "grid_no"], unique=True)
    db["lights"].create(
        {
            "frame_id": int,
            "night": str,
            "target": str,
            "filter": str,
            "target_id": int,
            "bias_id": int,
            "dark_id": int,
            "flat_id": int,
            "calibration": str,  # JSON: notes, skipped steps, pixel counts
            "background": float,  # sky, ADU/s
            "background_rms": float,  # ADU per pixel
            "n_stars": int,
            "fwhm": float,  # px
            "fwhm_arcsec": float,
            "elongation": float,
            "transparency": float,
            "align_method": str,
            "align_rms": float,
            "n_matches": int,
            "dx": float,
            "dy": float,
            "rotation": float,
            "flipped": int,
            "matrix": str,  # JSON 2x3: frame pixel -> grid pixel
            "verdict": str,  # accepted, rejected
            "reason": str,
            "numbers": str,  # JSON: the numbers behind the verdict
            "weight": float,  # in the coadd
            "processed": str,
        },
        pk="frame_id",
        foreign_keys=[("frame_id", "frames", "id"), ("target_id", "targets", "id")],
    )
    db["lights"].create_index(["night", "target", "filter"])
    db["coadds"].create(
        {
            "id": int,
            "night": str,
            "target_id": int,
            "target": str,  # display name of the grid
            "filter": str,
            "n_frames": int,
            "checkpoint": str,  # the .npz of the running state
            "checkpoint_frames": str,  # JSON: frame ids that checkpoint holds
            "fits": str,
            "png": str,
            "stats": str,
            "updated": str,
        },
        pk="id",
        foreign_keys=[("target_id", "targets", "id")],
    )
    db["coadds"].create_index(["target_id", "filter"], unique=True)


MIGRATIONS: Sequence[Callable[[sqlite_utils.Database], None]] = (_v1, _v2, _v3)
SCHEMA_VERSION = len(MIGRATIONS)

# Frame columns that hold JSON text.
_JSON_COLUMNS = (
    "problems",
    "sources",
    "inputs",
    "depends",
    "stats",
    "flats",
    "warnings",
    "grid",
    "filter_refs",
    "calibration",
    "numbers",
    "matrix",
)


class Catalog:
    """Read and write the catalog.

    One pipeline worker writes; any number of readers (``observd status``, the dome
    page, the summary) may open the same file at the same time.

    Parameters
    ----------
    path
        The SQLite file; its folder is created when missing.
    readonly
        Open for reading only (never creates or migrates).
    """

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly:
            if not self.path.exists():
                raise CatalogError(f"catalog {self.path} does not exist yet")
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        else:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, timeout=30)
            except (OSError, sqlite3.Error) as exc:
                raise CatalogError(f"cannot open catalog {self.path}: {exc}") from exc
        conn.execute("PRAGMA busy_timeout = 30000")
        self.db = sqlite_utils.Database(conn)
        self.readonly = readonly
        if not readonly:
            self.db.enable_wal()
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
        self._migrate()

    # -- lifecycle -----------------------------------------------------------------

    def _migrate(self) -> None:
        version = self.schema_version
        if version > SCHEMA_VERSION:
            raise CatalogError(
                f"catalog {self.path} has schema version {version}, newer than this "
                f"observd understands ({SCHEMA_VERSION}); upgrade observd"
            )
        if version == SCHEMA_VERSION:
            return
        if self.readonly:
            raise CatalogError(
                f"catalog {self.path} needs migration from schema {version} to "
                f"{SCHEMA_VERSION}; open it once with a writing observd command"
            )
        for target in range(version, SCHEMA_VERSION):
            with self.db.conn:
                MIGRATIONS[target](self.db)
                self.db.execute(f"PRAGMA user_version = {target + 1}")

    @property
    def schema_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        self.db.conn.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes so that a crash leaves all of them or none."""
        with self.db.conn:
            yield

    # -- frames --------------------------------------------------------------------

    def frame_by_path(self, path: str | Path) -> dict[str, Any] | None:
        rows = list(self.db["frames"].rows_where("path = ?", [str(path)], limit=1))
        return _decode(rows[0]) if rows else None

    def frame(self, frame_id: int) -> dict[str, Any]:
        return _decode(self.db["frames"].get(frame_id))

    def first_with_hash(self, sha256: str, *, exclude_id: int | None = None) -> dict | None:
        """The earliest recorded frame with this content (the original of a duplicate)."""
        where, args = "sha256 = ?", [sha256]
        if exclude_id is not None:
            where += " and id != ?"
            args.append(exclude_id)
        rows = list(self.db["frames"].rows_where(where, args, order_by="id", limit=1))
        return _decode(rows[0]) if rows else None

    def insert_frame(self, row: Mapping[str, Any]) -> int:
        """Record a new file; returns its id."""
        now = utcnow()
        record = {"first_seen": now, "updated": now, **_encode(row)}
        return int(self.db["frames"].insert(record).last_pk)

    def update_frame(self, frame_id: int, changes: Mapping[str, Any]) -> None:
        self.db["frames"].update(frame_id, {**_encode(changes), "updated": utcnow()})

    def frames(
        self,
        where: str | None = None,
        args: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        order_by: str = "coalesce(date_obs, first_seen), id",
    ) -> list[dict[str, Any]]:
        """Frames matching an SQL condition, in observing order."""
        return [_decode(r) for r in self.db["frames"].rows_where(where, args, order_by=order_by)]

    def nights(self) -> list[str]:
        rows = self.db.execute(
            "select distinct night from frames where night is not null order by night"
        ).fetchall()
        return [r[0] for r in rows]

    # -- events --------------------------------------------------------------------

    def log_event(
        self,
        stage: str,
        action: str,
        reason: str | None = None,
        *,
        frame_id: int | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        """Record one decision: who (stage), what (action), why (reason)."""
        self.db["events"].insert(
            {
                "time": utcnow(),
                "frame_id": frame_id,
                "stage": stage,
                "action": action,
                "reason": reason,
                "details": json_text(details) if details else None,
            }
        )

    def events(self, frame_id: int | None = None) -> list[dict[str, Any]]:
        if frame_id is None:
            rows = self.db["events"].rows_where(order_by="id")
        else:
            rows = self.db["events"].rows_where("frame_id = ?", [frame_id], order_by="id")
        return list(rows)

    # -- masters -------------------------------------------------------------------

    def insert_master(self, row: Mapping[str, Any]) -> int:
        """Record a new master version and mark the previous one superseded."""
        with self.transaction():
            self.db.execute(
                "update masters set status = 'superseded' where master_key = ? "
                "and status = 'current'",
                [row["master_key"]],
            )
            return int(
                self.db["masters"]
                .insert({"created": utcnow(), "status": "current", **_encode(row)})
                .last_pk
            )

    def master(self, master_id: int) -> dict[str, Any]:
        return _decode(self.db["masters"].get(master_id))

    def masters(
        self, where: str | None = None, args: Sequence[Any] | None = None
    ) -> list[dict[str, Any]]:
        rows = self.db["masters"].rows_where(where, args, order_by="night, master_key, version")
        return [_decode(r) for r in rows]

    def current_master(self, master_key: str) -> dict[str, Any] | None:
        rows = self.masters("master_key = ? and status = 'current'", [master_key])
        return rows[-1] if rows else None

    def nearest_masters(
        self,
        kind: str,
        setup: str,
        night: str,
        max_age_days: float,
        *,
        filter: str | None = None,
        exptime: float | None = None,
    ) -> list[dict[str, Any]]:
        """Current masters of a kind and setup, nearest night first, within the age limit.

        The same night comes first; between equally distant nights the earlier one
        wins (a master from before the light existed when it was taken).
        """
        where = [
            "kind = ?",
            "setup = ?",
            "status = 'current'",
            "abs(julianday(night) - julianday(?)) <= ?",
        ]
        args: list[Any] = [kind, setup, night, max_age_days]
        if filter is not None:
            where.append("filter = ?")
            args.append(filter)
        if exptime is not None:
            where.append("abs(exptime - ?) <= 1e-6 * max(1.0, ?)")
            args += [exptime, exptime]
        rows = self.db.execute(
            "select * from masters where "
            + " and ".join(where)
            + " order by abs(julianday(night) - julianday(?)), night, version desc",
            [*args, night],
        ).fetchall()
        columns = [d[0] for d in self.db.execute("select * from masters limit 0").description]
        return [_decode(dict(zip(columns, r, strict=True))) for r in rows]

    def mark_master_used(self, master_id: int) -> None:
        self.db.execute("update masters set used = used + 1 where id = ?", [master_id])

    # -- camera health ---------------------------------------------------------------

    def camera_health(self, night: str | None = None) -> list[dict[str, Any]]:
        where, args = ("night = ?", [night]) if night else (None, None)
        return [
            _decode(r) for r in self.db["camera"].rows_where(where, args, order_by="night, setup")
        ]

    def upsert_camera(self, night: str, setup: str, values: Mapping[str, Any]) -> None:
        self.db["camera"].upsert(
            {"night": night, "setup": setup, "updated": utcnow(), **_encode(values)},
            pk=("night", "setup"),
        )

    # -- targets and lights ------------------------------------------------------

    def targets(self, night: str | None = None, target_slug: str | None = None) -> list[dict]:
        where, args = [], []
        if night:
            where.append("night = ?")
            args.append(night)
        if target_slug:
            where.append("target_slug = ?")
            args.append(target_slug)
        rows = self.db["targets"].rows_where(
            " and ".join(where) or None, args, order_by="night, target_slug, grid_no"
        )
        return [_decode(r) for r in rows]

    def target(self, target_id: int) -> dict[str, Any]:
        return _decode(self.db["targets"].get(target_id))

    def insert_target(self, row: Mapping[str, Any]) -> int:
        return int(self.db["targets"].insert({"created": utcnow(), **_encode(row)}).last_pk)

    def update_target(self, target_id: int, changes: Mapping[str, Any]) -> None:
        self.db["targets"].update(target_id, _encode(changes))

    def upsert_light(self, row: Mapping[str, Any]) -> None:
        self.db["lights"].upsert({"processed": utcnow(), **_encode(row)}, pk="frame_id")

    def lights(
        self,
        where: str | None = None,
        args: Sequence[Any] | None = None,
        *,
        columns: str = "l.*, f.path, f.date_obs, f.exptime, f.status",
    ) -> list[dict]:
        """Lights joined with their frames (``l.``, ``f.``); ``columns`` to fetch fewer
        (no JSON to decode: a coadd's FRAMES table after every frame)."""
        rows = self.db.execute(
            f"select {columns} from lights l "
            "join frames f on f.id = l.frame_id"
            + (f" where {where}" if where else "")
            + " order by f.date_obs, l.frame_id",
            list(args or []),
        )
        columns = [d[0] for d in rows.description]
        return [_decode(dict(zip(columns, r, strict=True))) for r in rows.fetchall()]

    def integrity_ok(self) -> bool:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def json_text(value: Any) -> str:
    """JSON for the catalog: numpy scalars as numbers, anything else odd as text."""
    return json.dumps(value, default=_json_default)


def _json_default(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else str(value)


def _encode(row: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}
    for key in _JSON_COLUMNS:
        if key in out and out[key] is not None and not isinstance(out[key], str):
            out[key] = json_text(out[key])
    return out


def _decode(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for key in _JSON_COLUMNS:
        if isinstance(out.get(key), str):
            out[key] = json.loads(out[key])
    return out
