"""Master calibrations on a simulated night, graded against the simulator's truth."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from observd.calibration import Calibrations
from observd.catalog import Catalog
from observd.combine import batch_clipped_mean
from observd.config import load_config
from observd.ingest import find_frame_files, in_time_order
from observd.pipeline import Pipeline
from observd.rawio import read_raw
from observd.simulate import CameraModel, NightPlan, simulate_night
from tests.conftest import write_config

SIZES = [512, pytest.param(1024, marks=pytest.mark.slow)]


def run_night(folder: Path, size: int, plan: NightPlan, camera: CameraModel | None = None):
    """Simulate a calibration night and take it through the real pipeline."""
    camera = camera or CameraModel(size=size)
    truth = simulate_night(folder / "sim", plan, camera)
    config = load_config(write_config(folder, incoming=str(folder / "sim" / "camera")))
    catalog = Catalog(config.paths.catalog)
    pipeline = Pipeline(config, catalog)
    for path in in_time_order(find_frame_files(config.paths.incoming, config), config):
        pipeline.process(path)
    pipeline.finish()
    return truth, catalog, pipeline


@pytest.fixture(scope="module", params=SIZES)
def night(request, tmp_path_factory):
    plan = NightPlan(n_light=0, targets=())  # the default calibration set: 15 / 7x3 / 9x3
    truth, catalog, pipeline = run_night(tmp_path_factory.mktemp("cal"), request.param, plan)
    yield truth, catalog, pipeline
    catalog.close()


def current(catalog: Catalog, kind: str, **where) -> dict:
    rows = [
        m for m in catalog.masters("kind = ? and status = 'current'", [kind])
        if all(m[k] == v for k, v in where.items())
    ]
    assert len(rows) == 1, (kind, where, rows)
    return rows[0]


def image(master: dict, ext: int | str = 0) -> np.ndarray:
    return fits.getdata(master["current_path"], ext).astype(np.float64)


def test_master_bias_error_within_1_1_read_noise_over_sqrt_n(night):
    truth, catalog, _ = night
    bias = current(catalog, "bias")
    n = bias["n_frames"]
    assert n == truth.plan.n_bias
    error = image(bias) - truth.read("bias.fits")
    ideal = truth.camera.read_noise / truth.camera.gain / math.sqrt(n)
    assert np.sqrt(np.mean(error**2)) <= 1.1 * ideal
    # versioned: one catalog row per refresh, only the current file kept (no light used one)
    versions = catalog.masters("master_key = ?", [bias["master_key"]])
    assert [v["version"] for v in versions] == list(range(1, n + 1))
    assert [v["status"] for v in versions].count("current") == 1
    assert Path(bias["path"]).samefile(bias["current_path"])
    assert all(not Path(v["path"]).exists() for v in versions[:-1])
    header = fits.getheader(bias["current_path"])
    assert header["IMAGETYP"] == "MASTER BIAS" and header["NCOMBINE"] == n


def test_incremental_master_equals_the_batch_combine(night):
    truth, catalog, _ = night
    bias = current(catalog, "bias")
    frames = [read_raw(catalog.frame(i)["path"]).data for i in bias["inputs"]]
    batch = batch_clipped_mean(frames, kind="bias")
    sigma = fits.getdata(bias["current_path"], "SIGMA")
    assert np.max(np.abs(image(bias) - batch.master) / sigma) <= 0.1


def test_dark_rate_and_hot_pixels_against_truth(night):
    truth, catalog, _ = night
    rate = current(catalog, "darkrate")
    assert rate["stats"]["exptimes"] == [30.0, 60.0, 120.0]
    fitted = image(rate)
    true_rate = truth.read("dark_rate.fits")
    # median per-pixel ratio: a noisy map of a skewed truth has a biased median of its own
    assert np.median(fitted / true_rate) == pytest.approx(1.0, abs=0.03)
    hot = fits.getdata(rate["current_path"], "HOTPIX").astype(bool)
    true_hot = truth.read("hot_pixels.fits")
    assert (hot & true_hot).sum() >= 0.95 * true_hot.sum()
    assert (hot & ~true_hot).sum() <= 0.01 * true_hot.sum() + 1
    # the dark taken 2 C warm is rejected with the reason, not folded in
    warm = [f for f in truth.files if "ccd temperature" in f.defects]
    (row,) = [catalog.frame_by_path(truth.path(f).absolute()) for f in warm]
    assert row["status"] == "rejected" and "off its set point" in row["reason"]


def test_master_flats_against_truth(night):
    truth, catalog, _ = night
    size = truth.camera.size
    edge = int(round(0.02 * size))
    inner = (slice(edge, size - edge), slice(edge, size - edge))
    for filt in truth.plan.filters:
        flat = current(catalog, "flat", filter=filt)
        master, true = image(flat), truth.read(f"flat_{filt}.fits")
        ratio = master / true
        ratio /= np.median(ratio[inner])
        assert np.sqrt(np.mean((ratio[inner] - 1) ** 2)) <= 0.005, filt
        # noise against the ideal for these flats (photon + read noise of each, averaged)
        cam = truth.camera
        levels = [f.flat_level - cam.bias_level for f in truth.frames("flat", filter=filt)]
        signal_e = np.array(levels) * cam.gain
        ideal = 1 / np.sqrt(np.sum(signal_e**2 / (signal_e + cam.read_noise**2)))
        resid = ratio[inner] - 1
        measured = 1.4826 * np.median(np.abs(np.diff(resid, axis=1))) / np.sqrt(2)
        assert measured <= 1.1 * ideal, (filt, measured / ideal)


def test_camera_health_against_truth(night):
    truth, catalog, _ = night
    (health,) = catalog.camera_health(truth.plan.night)
    cam = truth.camera
    assert health["read_noise_e"] == pytest.approx(cam.read_noise, rel=0.05)
    assert health["gain"] == pytest.approx(cam.gain, rel=0.05)
    assert health["dark_current_e"] == pytest.approx(cam.dark_current, rel=0.10)
    assert health["bias_level"] == pytest.approx(cam.bias_level, abs=2)
    assert health["hot_pixels"] > 0 and health["warnings"] == []


def test_selection_same_night_then_older_nights_then_waiting(night):
    truth, catalog, pipeline = night
    setup = current(catalog, "bias")["setup"]
    light = {"night": truth.plan.night, "setup": setup, "exptime": 60.0, "filter": "R",
             "calstat": None}  # fmt: skip
    sel = pipeline.calibrations.select(light)
    assert sel.ready and sel.dark["kind"] == "dark" and sel.dark["exptime"] == 60.0
    assert sel.flat["filter"] == "R" and sel.notes == []
    sel = pipeline.calibrations.select({**light, "exptime": 45.0})
    assert sel.dark["kind"] == "darkrate"  # no 45 s dark: the rate map, scaled
    later = {**light, "night": "2026-03-20"}  # 6 nights on: all masters still young enough
    sel = pipeline.calibrations.select(later)
    assert sel.ready and "flat from 2026-03-14" in sel.notes
    much_later = {**light, "night": "2026-03-25"}  # flats older than 7 days are not used
    sel = pipeline.calibrations.select(much_later)
    assert sel.waiting == ["flat R"] and sel.bias is not None
    sel = pipeline.calibrations.select({**light, "calstat": "BDF"})
    assert sel.ready and sel.skipped == ["bias", "dark", "flat"] and sel.bias is None


def test_restart_rebuilds_running_masters_from_the_catalog(night, tmp_path):
    truth, catalog, pipeline = night
    bias = current(catalog, "bias")
    fresh = Calibrations(pipeline.config.calibration, catalog, pipeline.products)
    frame = catalog.frame(bias["inputs"][-1])
    running = fresh._restore(bias["master_key"], {**frame, "id": -1})
    np.testing.assert_allclose(running.master.master, image(bias), rtol=0, atol=1e-4)


def test_observd_camera_reports_health_and_masters(night, capsys):
    import json

    from observd.cli import main

    truth, catalog, pipeline = night
    config = pipeline.config.source
    assert main(["camera", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "RN e-" in text and "flat R" in text and "MASTER" not in text
    assert main(["camera", "--json", "--config", str(config), "--night", truth.plan.night]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["health"][0]["read_noise_e"] > 0
    assert {m["kind"] for m in data["masters"]} == {"bias", "dark", "darkrate", "flat"}


def test_a_changed_flat_raises_an_alarm_and_an_unchanged_one_nothing(tmp_path):
    small = dict(n_bias=5, n_dark=3, dark_exptimes=(30.0, 60.0), n_flat=5, n_light=0,
                 targets=(), filters=("R",), defects=False)  # fmt: skip
    camera = CameraModel(size=384)
    config = load_config(write_config(tmp_path, incoming=str(tmp_path / "sim")))
    catalog = Catalog(config.paths.catalog)
    pipeline = Pipeline(config, catalog)
    nights = [("2026-03-14", 0.0), ("2026-03-15", 0.03), ("2026-03-16", 0.03)]
    for i, (night_date, change) in enumerate(nights):
        out = tmp_path / "sim" / night_date
        cam = CameraModel(size=camera.size, flat_change=change)
        simulate_night(out, NightPlan(night=night_date, seed=10 + i, **small), cam)
        for path in in_time_order(find_frame_files([out / "camera"], config), config):
            pipeline.process(path)
    pipeline.finish()
    health = {h["night"]: h for h in catalog.camera_health()}
    assert "change_status" not in health["2026-03-14"]["flats"]["R"]  # no earlier night
    second = health["2026-03-15"]
    assert second["flats"]["R"]["change_status"] == "alarm"
    assert second["warnings"] and "flat R changed" in second["warnings"][0]
    assert health["2026-03-16"]["flats"]["R"]["change_status"] == "ok"
    assert health["2026-03-16"]["warnings"] == []
    catalog.close()
