"""Every real frame in ../shared/data is classified as its README says, or rejected with
the reason its README predicts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from observd.catalog import Catalog
from observd.cli import main
from observd.config import load_config
from observd.ingest import find_frame_files, in_time_order
from observd.pipeline import Pipeline
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


@pytest.fixture(scope="module")
def real_night(tmp_path_factory):
    """The whole of ../shared/data ingested once (UTC nights): (data folder, catalog)."""
    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"real frames not found at {SHARED_DATA}")
    tmp = tmp_path_factory.mktemp("real")
    config = write_config(tmp, incoming=str(SHARED_DATA), timezone="UTC")
    assert main(["ingest", "-q", "--config", str(config), str(SHARED_DATA)]) == 0
    catalog = Catalog(tmp / "observd.sqlite", readonly=True)
    yield SHARED_DATA, catalog
    catalog.close()


def test_every_real_file_is_classified_as_its_readme_says(real_night):
    shared_data, cat = real_night
    rows = cat.frames()
    # the ingest stage's verdict (later stages may go on to use or flag a frame)
    ingest = {
        e["frame_id"]: (e["action"], e["reason"]) for e in cat.events() if e["stage"] == "ingest"
    }
    frames = sorted(p for p in shared_data.rglob("*") if p.is_file() and ".fit" in p.name.lower())
    assert len(rows) == len(frames) == 72
    for row in rows:
        rel = Path(row["path"]).relative_to(shared_data).as_posix()
        want = _expected_for(rel)
        status, reason = ingest[row["id"]]
        for key, value in want.items():
            if key == "reason":
                assert value in (reason or ""), (rel, reason)
            elif key == "status":
                assert status == value, (rel, status, reason)
            elif isinstance(value, float):
                assert row[key] == pytest.approx(value), (rel, key, row[key])
            else:
                assert row[key] == value, (rel, key, row[key], row["reason"])
        if status == "recorded":
            assert reason is None and row["night"] and row["sha256"], rel


def test_zwo_calibration_set_builds_masters_and_measures_the_camera(real_night):
    _, cat = real_night
    setup = "bin1x1_g0_o9_1280x960_grbg"  # the ASI120MC-S
    current = {
        (m["kind"], m["exptime"]): m
        for m in cat.masters("setup = ? and status = 'current'", [setup])
    }
    bias = current[("bias", None)]
    assert bias["n_frames"] == 8 and Path(bias["current_path"]).is_file()
    # dark signal grows with exposure (a warm, uncooled sensor)
    medians = [current[("dark", t)]["stats"]["median_adu"] for t in (1.0, 10.0, 30.0, 100.0)]
    assert medians == sorted(medians) and medians[-1] > 500
    rate = current[("darkrate", None)]
    assert rate["stats"]["exptimes"] == [0.1, 1.0, 10.0, 30.0, 100.0]
    assert 5 < rate["stats"]["median_rate_adu_s"] < 10
    (health,) = [h for h in cat.camera_health("2024-04-16") if h["setup"] == setup]
    # 12-bit ADC scaled by 16: read noise ~1.7 ADU(12 bit) ~ 28 ADU here
    assert 20 < health["read_noise_adu"] < 40
    assert health["bias_level"] == pytest.approx(2300, abs=10)
    assert 1000 < health["hot_pixels"] < 20000
    # one 100 s dark is warmer than its siblings: flagged with its numbers, not folded in
    flagged = cat.frames("status = 'flagged'")
    assert [Path(f["path"]).name for f in flagged] == ["Dark_ASIImg_100sec_frame0002.fit"]
    assert "disagrees with the master" in flagged[0]["reason"]
    # the ASI120 flats were taken under flickering light: banded, and said so
    flats = cat.frames("type = 'flat' and setup = ?", [setup])
    banded = [f for f in flats if "horizontal banding" in (f["reason"] or "")]
    assert len(banded) >= 3


def test_m13_night_is_accepted_aligned_and_stacked(tmp_path):
    """The five 5-s MaxIm frames of M 13 (faint, broad stars on a cluster's glow, drifting
    ~12 px a frame along x) go through the real pipeline: each is measured (found with a
    filter of the stars' width), accepted, aligned on the first frame's grid and stacked."""
    from tests.conftest import SHARED_DATA

    folder = SHARED_DATA / "maximdl_m13_astropy_tutorial"
    if not folder.is_dir():
        pytest.skip(f"real frames not found at {folder}")
    config = load_config(write_config(tmp_path, incoming=str(folder), timezone="UTC"))
    with Catalog(config.paths.catalog) as catalog:
        pipeline = Pipeline(config, catalog)
        for path in in_time_order(find_frame_files(config.paths.incoming, config), config):
            pipeline.process(path)
        pipeline.finish()
        lights = sorted(catalog.lights(), key=lambda row: row["date_obs"])
        frames = catalog.frames("type = 'light'")
        coadds = list(catalog.db["coadds"].rows)
    assert len(lights) == 5
    print("\nM 13 through the pipeline: offset (px), matched stars, fit rms (px), FWHM (px)")
    for row in lights:
        print(f"  {Path(row['path']).name}: {row['verdict']} {row['reason'] or ''} "
              f"({row['dx'] or 0:+.2f}, {row['dy'] or 0:+.2f}) {row['n_matches']} stars, "
              f"rms {row['align_rms'] or 0:.2f}, FWHM {row['fwhm']:.1f}, "
              f"elongation {row['elongation']:.2f}, {row['n_stars']} sources")
    assert all(row["verdict"] == "accepted" for row in lights), [r["reason"] for r in lights]
    assert {f["status"] for f in frames} == {"stacked"}
    # the stars are broad and round (FWHM 8-14 px as measured on the mean star), not lost
    assert all(7 < row["fwhm"] < 16 and row["elongation"] < 1.25 for row in lights)
    assert lights[0]["align_method"] == "reference"
    assert all(row["align_method"] == "stars" and row["n_matches"] >= 8 for row in lights[1:])
    # faint stars: ~1-2 px per star, so the fit of >= 8 stars to a few tenths of a pixel
    assert all(row["align_rms"] < 2.0 for row in lights[1:])
    dx = np.array([row["dx"] for row in lights])
    assert np.all(np.diff(dx) > 7) and np.all(np.diff(dx) < 15)  # the drift along x
    (coadd,) = coadds
    assert coadd["n_frames"] == 5 and Path(coadd["fits"]).is_file()
