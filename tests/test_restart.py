"""A crash in the middle of a night loses nothing and counts nothing twice."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from observd.catalog import Catalog
from observd.config import load_config
from observd.ingest import find_frame_files, in_time_order
from observd.pipeline import Pipeline
from observd.simulate import CameraModel, NightPlan, simulate_night
from tests.conftest import write_config


def _run(folder, camera_dir, crash_after: int | None):
    config = load_config(write_config(folder, incoming=str(camera_dir), extra=""))
    paths = in_time_order(find_frame_files([camera_dir], config), config)
    catalog = Catalog(config.paths.catalog)
    pipeline = Pipeline(config, catalog)
    for i, path in enumerate(paths):
        if i == crash_after:  # the process dies: nothing flushed, nothing finished
            catalog.close()
            catalog = Catalog(config.paths.catalog)
            pipeline = Pipeline(config, catalog)  # the restart
        pipeline.process(path)
    pipeline.finish()
    return config, catalog


@pytest.mark.parametrize(
    "when", ["calibrations", "after the darks", "first lights", "late lights"]
)
def test_a_crash_mid_night_gives_the_same_stacks(tmp_path, when):
    plan = NightPlan(n_bias=5, n_dark=3, dark_exptimes=(60.0,), n_flat=5, filters=("R", "V"),
                     targets=("M 51",), n_light=8, meridian_flip=False)  # fmt: skip
    truth = simulate_night(tmp_path / "sim", plan, CameraModel(size=256))
    camera = truth.camera_dir
    n_files = len(truth.files)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    config_a, cat_a = _run(tmp_path / "a", camera, None)
    n_lights = len(truth.frames("light"))
    crash_after = {
        "calibrations": n_files - n_lights - 3,
        # the dark-rate (hot-pixel) map is fitted lazily: a crash before it is must not
        # leave the lights without it
        "after the darks": len(truth.frames("bias")) + len(truth.frames("dark")),
        "first lights": n_files - n_lights + 1,  # a provisional frame is held in memory
        "late lights": n_files - 5,
    }[when]
    config_b, cat_b = _run(tmp_path / "b", camera, crash_after=crash_after)
    assert cat_b.integrity_ok()
    stacks_a = sorted(config_a.paths.products.glob("stacks/*/*/*.fits"))
    stacks_b = sorted(config_b.paths.products.glob("stacks/*/*/*.fits"))
    assert [p.name for p in stacks_a] == [p.name for p in stacks_b] and stacks_a
    for a, b in zip(stacks_a, stacks_b, strict=True):
        ha, hb = fits.getheader(a), fits.getheader(b)
        assert ha["NCOMBINE"] == hb["NCOMBINE"] and ha["EXPTIME"] == hb["EXPTIME"]
        da, db = fits.getdata(a), fits.getdata(b)
        ok = np.isfinite(da)
        assert np.array_equal(ok, np.isfinite(db))
        scale = np.nanmax(np.abs(da))
        assert np.max(np.abs(da[ok] - db[ok])) <= 1e-5 * scale, a.name
    statuses_a = {r["path"]: r["status"] for r in cat_a.frames()}
    statuses_b = {r["path"]: r["status"] for r in cat_b.frames()}
    assert statuses_a == statuses_b
    for cat in (cat_a, cat_b):
        cat.close()


def test_restack_after_late_flats_uses_them(tmp_path, capsys):
    from observd.cli import main

    plan = NightPlan(n_bias=5, n_dark=3, dark_exptimes=(60.0,), n_flat=5, filters=("R", "V"),
                     targets=("M 51",), n_light=6, meridian_flip=False, defects=False)  # fmt: skip
    truth = simulate_night(tmp_path / "sim", plan, CameraModel(size=256))
    config_path = write_config(tmp_path, incoming=str(truth.camera_dir))
    config = load_config(config_path)
    paths = in_time_order(find_frame_files([truth.camera_dir], config), config)
    flats = [p for p in paths if truth.file(p).type == "flat"]
    with Catalog(config.paths.catalog) as catalog:
        pipeline = Pipeline(config, catalog)
        for path in paths:  # the night without its flats: lights wait, then go on without
            if path not in flats:
                pipeline.process(path)
        pipeline.finish()
        before = catalog.lights()
        assert all(light["flat_id"] is None for light in before)
        assert all("without flat" in (light["reason"] or "") for light in before)
        for path in flats:  # the flats turn up (dawn flats, a copy from another PC)
            pipeline.process(path)
        assert set(pipeline.stale_targets()) == {t["id"] for t in catalog.targets()}
        pipeline.finish()  # the superseded stacks are rebuilt by themselves
        assert pipeline.stale_targets() == {}
        assert all(light["flat_id"] for light in catalog.lights())
        assert [e["action"] for e in catalog.events() if e["stage"] == "stack"
                and e["action"] == "rebuild"] == ["rebuild"]  # fmt: skip
        for stack in sorted(config.paths.products.glob("stacks/*/*/*.fits")):
            assert any("master flat" in str(h) for h in fits.getheader(stack)["HISTORY"])
    assert main(["restack", "--config", str(config_path), "--night", plan.night]) == 0
    assert "restacked 12 lights" in capsys.readouterr().out
    with Catalog(config.paths.catalog, readonly=True) as catalog:
        after = {light["frame_id"]: light for light in catalog.lights()}
        assert all(after[light["frame_id"]]["flat_id"] for light in before)
        for stack in sorted(config.paths.products.glob("stacks/*/*/*.fits")):
            header = fits.getheader(stack)
            assert header["NCOMBINE"] == 6
            assert any("master flat" in str(h) for h in header["HISTORY"])
