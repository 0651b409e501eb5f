from __future__ import annotations

import sqlite3

import pytest

from observd.catalog import SCHEMA_VERSION, Catalog, CatalogError


def test_new_catalog_has_schema_wal_and_tables(tmp_path):
    path = tmp_path / "sub" / "o.sqlite"
    with Catalog(path) as cat:
        assert cat.schema_version == SCHEMA_VERSION
        assert cat.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert {"frames", "events"} <= set(cat.db.table_names())
        assert cat.integrity_ok()


def test_frames_and_events_round_trip(tmp_path):
    with Catalog(tmp_path / "o.sqlite") as cat:
        fid = cat.insert_frame(
            {
                "path": "/a.fits",
                "status": "recorded",
                "problems": ["x"],
                "sources": {"type": "IMAGETYP"},
            }
        )
        cat.log_event("ingest", "recorded", None, frame_id=fid, details={"n": 1})
        cat.update_frame(fid, {"status": "rejected", "reason": "why"})
        row = cat.frame_by_path("/a.fits")
        assert row["status"] == "rejected" and row["reason"] == "why"
        assert row["problems"] == ["x"] and row["sources"] == {"type": "IMAGETYP"}
        assert row["updated"] >= row["first_seen"]
        (event,) = cat.events(fid)
        assert (event["stage"], event["action"]) == ("ingest", "recorded")


def test_paths_are_unique(tmp_path):
    with Catalog(tmp_path / "o.sqlite") as cat:
        cat.insert_frame({"path": "/a.fits", "status": "recorded"})
        with pytest.raises(sqlite3.IntegrityError):
            cat.insert_frame({"path": "/a.fits", "status": "recorded"})


def test_readonly_reader_sees_writer_and_cannot_write(tmp_path):
    path = tmp_path / "o.sqlite"
    with Catalog(path) as writer:
        writer.insert_frame({"path": "/a.fits", "status": "recorded", "night": "2026-03-14"})
        with Catalog(path, readonly=True) as reader:
            assert reader.nights() == ["2026-03-14"]
            with pytest.raises(sqlite3.OperationalError):
                reader.insert_frame({"path": "/b.fits", "status": "recorded"})


def test_readonly_missing_catalog_is_a_clear_error(tmp_path):
    with pytest.raises(CatalogError, match="does not exist yet"):
        Catalog(tmp_path / "none.sqlite", readonly=True)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "o.sqlite"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    conn.close()
    with pytest.raises(CatalogError, match="newer than this observd understands"):
        Catalog(path)


def test_old_catalog_is_migrated_in_place(tmp_path):
    path = tmp_path / "o.sqlite"
    sqlite3.connect(path).close()  # an empty database: schema version 0
    with Catalog(path) as cat:
        assert cat.schema_version == SCHEMA_VERSION
        assert "frames" in cat.db.table_names()
