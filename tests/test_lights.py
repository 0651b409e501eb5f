"""Lights through the real pipeline on a simulated night, graded against the truth."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from observd.catalog import Catalog
from observd.config import load_config
from observd.ingest import find_frame_files, in_time_order
from observd.pipeline import Pipeline
from observd.rawio import read_raw
from observd.reduce import calibrate, prepare
from observd.simulate import CameraModel, NightPlan, simulate_night
from tests.conftest import write_config

REASONS = {"cloudy": "clouds", "trailed": "trailing", "defocused": "seeing/focus"}


@pytest.fixture(scope="module", params=[512, pytest.param(1024, marks=pytest.mark.slow)])
def night(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lights")
    plan = NightPlan(n_bias=7, n_dark=5, n_flat=7, n_light=10, wcs="mixed", meridian_flip=True)
    truth = simulate_night(folder / "sim", plan, CameraModel(size=request.param))
    config = load_config(write_config(folder, incoming=str(folder / "sim" / "camera")))
    catalog = Catalog(config.paths.catalog)
    pipeline = Pipeline(config, catalog)
    for path in in_time_order(find_frame_files(config.paths.incoming, config), config):
        pipeline.process(path)
    pipeline.finish()
    yield truth, catalog, pipeline
    catalog.close()


def _light_rows(truth, catalog):
    rows = {r["path"]: r for r in catalog.lights()}
    return [(f, rows[str(truth.path(f).absolute())]) for f in truth.frames("light")]


def test_every_defect_is_rejected_with_the_right_reason(night):
    truth, catalog, _ = night
    good = rejected_good = 0
    for f, row in _light_rows(truth, catalog):
        defects = [d for d in f.defects if d in REASONS]
        if defects:
            assert row["verdict"] == "rejected", f.path
            assert row["reason"].startswith(REASONS[defects[0]]), (f.path, row["reason"])
        else:
            good += 1
            rejected_good += row["verdict"] == "rejected"
    assert rejected_good <= 0.02 * good


def test_good_frames_register_within_0_2_px_of_the_truth(night):
    truth, catalog, pipeline = night
    n = truth.camera.size
    ys, xs = np.mgrid[0:n:32, 0:n:32]
    pts = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
    errors, methods, flipped = [], set(), 0
    for f, row in _light_rows(truth, catalog):
        if f.expected != "ok":
            continue
        target = next(t for t in catalog.targets(f.night) if t["id"] == row["target_id"])
        pad_y, pad_x = target["grid"]["pad"]
        want = np.array(f.transform.matrix) + [[0, 0, pad_x], [0, 0, pad_y]]
        got = np.array(row["matrix"])
        errors.append(np.sqrt(np.mean(np.sum((got @ pts - want @ pts) ** 2, axis=0))))
        methods.add((f.wcs, row["align_method"]))
        flipped += bool(row["flipped"])
    errors = np.array(errors)
    assert np.mean(errors <= 0.2) >= 0.98, np.sort(errors)[-5:]
    assert flipped >= 3  # the meridian flip of the first target
    assert ("perturbed", "wcs") not in methods  # a wrong WCS is never trusted
    assert {m for _, m in methods} >= {"stars", "reference"}


def test_provenance_names_the_masters_used(night):
    truth, catalog, _ = night
    for f, row in _light_rows(truth, catalog):
        if row["verdict"] != "accepted":
            continue
        for step in ("bias", "dark", "flat"):
            master = catalog.master(row[f"{step}_id"])
            assert master["used"] >= 1 and master["night"] == f.night
        assert catalog.master(row["flat_id"])["filter"] == f.filter


def test_calibrated_sky_is_flat_to_half_a_percent(night):
    truth, catalog, pipeline = night
    f, row = next((f, r) for f, r in _light_rows(truth, catalog) if f.expected == "ok"
                  and f.filter == "V")  # fmt: skip
    load = pipeline.calibrations.load
    dark = pipeline.calibrations.dark_image(catalog.master(row["dark_id"]), f.exptime)
    masters = prepare(
        load(catalog.master(row["bias_id"])), dark, load(catalog.master(row["flat_id"]))
    )
    cal = calibrate(read_raw(truth.path(f)).data, masters)
    n = truth.camera.size
    # the scene without the sky (stars, galaxy) taken out with the truth, then the sky
    # compared with its true (gradient) model in blocks
    scene = fits.getdata(truth.truth_dir / f"sky_{truth.targets[f.target].slug}_{f.filter}.fits")
    m = np.array(f.transform.matrix)
    import cv2

    scene_frame = cv2.warpAffine(scene.astype(np.float32), m, (n, n),
                                 flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)  # fmt: skip
    sky = cal.image - scene_frame * f.exptime * f.transparency
    c = (n - 1) / 2
    y, x = np.mgrid[0:n, 0:n]
    gx, gy = f.sky_gradient
    model = f.sky_rate / truth.camera.gain * f.exptime * (1 + gx * (x - c) / n + gy * (y - c) / n)
    block = n // 16
    ratio = (sky / model).reshape(16, block, 16, block)
    ratio = np.median(ratio, axis=(1, 3))[1:-1, 1:-1]  # the outer blocks: edge effects
    assert np.std(ratio / np.median(ratio)) <= 0.005
