"""A simulated night through `observd simulate` + `observd ingest`, checked against its truth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from astropy.io import fits

from observd.cli import main
from observd.simulate import CameraModel, NightPlan, load_truth, simulate_night
from tests.conftest import write_config

SMALL = dict(n_bias=5, n_dark=3, dark_exptimes=(30.0, 60.0), n_flat=5, n_light=4)


@pytest.mark.parametrize("dialect", ["maxim", "nina"])
def test_every_simulated_frame_is_classified_correctly(tmp_path, capsys, dialect):
    out = tmp_path / "night"
    if dialect == "maxim":  # the command, with the default calibration set
        assert main(["simulate", str(out), "--size", "256", "--lights", "4"]) == 0
        truth = load_truth(out)
    else:
        truth = simulate_night(out, NightPlan(**SMALL, dialect=dialect), CameraModel(size=256))
    config = write_config(tmp_path, incoming=str(out / "camera"))
    assert main(["ingest", "-q", "--config", str(config), str(out / "camera")]) == 0
    capsys.readouterr()
    assert main(["status", "--json", "--config", str(config)]) == 0
    frames = {Path(f["path"]): f for f in json.loads(capsys.readouterr().out)["frames"]}
    assert len(frames) == len(truth.files)
    for f in truth.files:
        row = frames[truth.path(f).absolute()]
        got = (row["type"], row["filter"], row["exptime"], row["target"], row["night"])
        want = (f.type, f.filter, f.exptime, f.target, f.night)
        assert got == want, f.path
        # what the truth expects: used, or rejected (a warm dark, a cloudy light, ...)
        assert (row["status"] == "rejected") == f.expected.startswith("rejected"), (f.path, row)


def test_live_junk_gets_the_reasons_the_truth_predicts(tmp_path):
    out = tmp_path / "night"
    plan = NightPlan(**{**SMALL, "n_light": 2}, defects=False)
    truth = simulate_night(out, plan, CameraModel(size=256), live=True, speed=1e6, junk=True)
    config = write_config(tmp_path, incoming=str(out / "camera"))
    assert main(["ingest", "-q", "--config", str(config), str(out / "camera")]) == 0
    from observd.catalog import Catalog

    words = {"truncated": "truncated", "empty": "empty file", "not FITS": "not a FITS file"}
    with Catalog(tmp_path / "observd.sqlite", readonly=True) as cat:
        rows = {Path(r["path"]): r for r in cat.frames()}
    junk = [f for f in truth.files if f.expected.startswith("rejected: ") and f.type == "unknown"]
    junk += [f for f in truth.files if f.expected in ("rejected: truncated",)]
    assert junk, "the simulator wrote no junk"
    for f in junk:
        why = f.expected.removeprefix("rejected: ")
        row = rows[truth.path(f).absolute()]
        assert row["status"] == "rejected" and words[why] in row["reason"], (f.path, row["reason"])
    ignored = [f for f in truth.files if f.expected.startswith("ignored")]
    for f in ignored:
        assert truth.path(f).absolute() not in rows


def test_demo_runs_the_night_and_leaves_stacks_and_colour(tmp_path, capsys):
    # the live demo, faster than its default pace (simulated seconds per real second)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--speed", "3000"]) == 0
    out = capsys.readouterr().out
    assert "stacks:" in out and "colour" in out
    stacks = sorted((tmp_path / "demo" / "products" / "stacks").rglob("*.fits"))
    assert len(stacks) == 6  # two targets x three filters
    header = fits.getheader(stacks[0])
    assert header["NCOMBINE"] >= 3 and header["EXPTIME"] >= 180
    assert fits.getdata(stacks[0], "EXPMAP").max() >= 180
    assert len(fits.getdata(stacks[0], "FRAMES")) >= header["NCOMBINE"]
    assert len(list((tmp_path / "demo" / "products" / "stacks").rglob("*_rgb.png"))) == 2
    summary = tmp_path / "demo" / "products" / "summary" / "2026-03-14"
    assert f"morning summary: {summary / 'index.html'}" in out
    truth = load_truth(tmp_path / "demo")  # 36 lights and a truncated one (camera junk)
    lights = [f for f in truth.files if f.type == "light"]
    assert json.loads((summary / "summary.json").read_text())["totals"]["lights"] == len(lights)
