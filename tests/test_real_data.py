"""Every real frame in ../shared/data is classified as its README says, or rejected with
the reason its README predicts."""

from __future__ import annotations

from pathlib import Path

import pytest

from observd.catalog import Catalog
from observd.cli import main
from tests.conftest import write_config

ZWO = "zwo_asi120mc_calib/Optical/data"
SEESTAR = "seestar_s50_osc/seestar"

# relative path (prefix) -> expected columns; a prefix covers every file under it
EXPECTED: dict[str, dict] = {
    f"{ZWO}/ASI120/Bias/": {"type": "bias", "status": "recorded", "exptime": 6.4e-05},
    f"{ZWO}/ASI120/Dark/Dark_0.1s/": {"type": "dark", "status": "recorded", "exptime": 0.1},
    f"{ZWO}/ASI120/Dark/Dark_1s/": {"type": "dark", "status": "recorded", "exptime": 1.0},
    f"{ZWO}/ASI120/Dark/Dark_10s/": {"type": "dark", "status": "recorded", "exptime": 10.0},
    f"{ZWO}/ASI120/Dark/Dark_30s/": {"type": "dark", "status": "recorded", "exptime": 30.0},
    f"{ZWO}/ASI120/Dark/Dark_100s/": {"type": "dark", "status": "recorded", "exptime": 100.0},
    f"{ZWO}/ASI120/Flat/": {"type": "flat", "status": "recorded", "exptime": 0.005},
    f"{ZWO}/ASI178/Bias/": {"type": "bias", "status": "recorded", "exptime": 3.2e-05},
    f"{ZWO}/ASI178/Flat/Flat_ASIImg_frame0004.fit": {"type": "flat", "status": "recorded"},
    f"{ZWO}/ASI178/Flat/Flat_ASIImg_frame0001.fit": {
        "type": "flat",
        "status": "rejected",
        "reason": "truncated data: file has 2097152 bytes",
    },
    f"{ZWO}/ASI178/Dark/Dark_1s/": {
        "type": "dark",
        "status": "rejected",
        "reason": "truncated data: file has 2097152 bytes",
    },
    "maximdl_m13_astropy_tutorial/": {
        "type": "light",
        "status": "recorded",
        "target": "M 13",
        "filter": "B",
        "exptime": 5.0,
        "calstat": "C",  # MaxIm calibrated them already: never calibrate again
        "night": "2013-05-04",  # 04:09 UTC belongs to the evening before
    },
    f"{SEESTAR}/examples/1/": {
        "type": "light",
        "status": "recorded",
        "target": "M 94",
        "filter": "IRCUT",
        "bayer": "GRBG",
        "night": "2025-03-26",
    },
    f"{SEESTAR}/sample/Light_NGC 7023_10.0s": {
        "type": "light",
        "status": "recorded",
        "target": "NGC 7023",
        "has_wcs": 1,
    },
    f"{SEESTAR}/sample/Light_NGC 7023_20.0s": {
        "type": "light",
        "status": "recorded",
        "exptime": 20.0,
        "has_wcs": 0,
    },
    "header_zoo/ccdproc/a8280271.fits": {"type": "light", "status": "recorded", "exptime": 150.04},
    "header_zoo/ccdproc/sip-wcs.fit": {"type": "light", "filter": "B", "has_wcs": 1},
    "header_zoo/msumastro/aspen_trimmed.fit": {"type": "flat", "filter": "R", "status": "recorded"},
    "header_zoo/msumastro/celestron": {"type": "light", "status": "recorded", "target": "Mette"},
    "header_zoo/msumastro/maximdl_5_2": {"type": "light", "status": "recorded"},
    "header_zoo/msumastro/maximdl_6_16": {"type": "light", "target": "NGC 6946", "filter": "B"},
    "header_zoo/msumastro/maximdl_6_18": {"type": "light", "target": "kelt-16-b", "has_wcs": 1},
    "header_zoo/msumastro/uint16": {"type": "light", "exptime": 90.0},
    "header_zoo/msumastro/neon-on-dome": {
        "type": "unknown",  # SBIG CCDOPS: no IMAGETYP, and the name does not say
        "status": "rejected",
        "reason": "no IMAGETYP",
    },
    "header_zoo/photonfinder/M106": {"status": "rejected", "reason": "no image data (header only)"},
    "header_zoo/stellarphot/TIC-367710318": {"type": "light", "filter": "r'", "calstat": "BDF"},
    "header_zoo/stellarphot/TIC-402828941": {
        "type": "light",
        "filter": "i'",
        "status": "rejected",
        "reason": "constant image: every pixel is 0",  # pixels zeroed to make the file tiny
    },
    "header_zoo/stellarphot/wasp-10-tiny": {
        "type": "light",
        "status": "rejected",
        "reason": "constant image: every pixel is 0",
    },
    "header_zoo/stellarphot/c": {"type": "light", "status": "recorded", "target": "wasp 10 b"},
}


def _expected_for(rel: str) -> dict:
    matches = [key for key in EXPECTED if rel.startswith(key)]
    assert matches, f"no expectation for {rel}"
    return EXPECTED[max(matches, key=len)]


def test_every_real_file_is_classified_as_its_readme_says(tmp_path, shared_data: Path):
    config = write_config(tmp_path, incoming=str(shared_data), timezone="UTC")
    assert main(["ingest", "-q", "--config", str(config), str(shared_data)]) == 0
    with Catalog(tmp_path / "observd.sqlite", readonly=True) as cat:
        rows = cat.frames()
    frames = sorted(p for p in shared_data.rglob("*") if p.is_file() and ".fit" in p.name.lower())
    assert len(rows) == len(frames) == 72
    for row in rows:
        rel = Path(row["path"]).relative_to(shared_data).as_posix()
        want = _expected_for(rel)
        for key, value in want.items():
            if key == "reason":
                assert value in (row["reason"] or ""), (rel, row["reason"])
            elif isinstance(value, float):
                assert row[key] == pytest.approx(value), (rel, key, row[key])
            else:
                assert row[key] == value, (rel, key, row[key], row["reason"])
        if row["status"] == "recorded":
            assert row["reason"] is None and row["night"] and row["sha256"], rel
