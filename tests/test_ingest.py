from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from observd.catalog import Catalog
from observd.cli import main
from observd.config import load_config
from observd.ingest import find_frame_files, ingest_file
from tests.conftest import write_config


def light_header(**changes) -> fits.Header:
    header = fits.Header()
    header["IMAGETYP"] = "Light Frame"
    header["EXPTIME"] = 60.0
    header["DATE-OBS"] = "2026-03-15T05:12:00"
    header["FILTER"] = "R"
    header["OBJECT"] = "M51"
    for key, value in changes.items():
        key = key.replace("_", "-")
        if value is None:
            del header[key]
        else:
            header[key] = value
    return header


def write_light(path: Path, seed: int = 0, **changes) -> Path:
    data = np.random.default_rng(seed).integers(900, 1100, (64, 64)).astype(np.uint16)
    fits.PrimaryHDU(data, light_header(**changes)).writeto(path)
    return path


def make_bad_files(folder: Path) -> dict[str, tuple[str, str]]:
    """Every kind of bad input the foundation issue lists: name -> (status, reason part)."""
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, tuple[str, str]] = {}

    (folder / "zero.fits").write_bytes(b"")
    expected["zero.fits"] = ("rejected", "empty file (0 bytes)")

    good = write_light(folder / "good.fits")
    expected["good.fits"] = ("recorded", "")

    blob = good.read_bytes()
    (folder / "truncated.fits").write_bytes(blob[: 2880 + 3000])
    expected["truncated.fits"] = ("rejected", "truncated data: file has 5880 bytes")

    (folder / "notes.fits").write_text("Observing log, night of 14 March\nseeing 2.1\n")
    expected["notes.fits"] = ("rejected", "not a FITS file (begins with 'Observing log")

    write_light(folder / "noexp.fits", seed=1, EXPTIME=None)
    expected["noexp.fits"] = ("rejected", "exposure")

    nan = np.full((32, 32), np.nan, dtype=np.float32)
    fits.PrimaryHDU(nan, light_header()).writeto(folder / "nan.fits")
    expected["nan.fits"] = ("rejected", "no valid pixels (all NaN or infinite)")

    cube = np.random.default_rng(2).integers(0, 1000, (3, 32, 32)).astype(np.uint16)
    fits.PrimaryHDU(cube, light_header()).writeto(folder / "cube.fits")
    expected["cube.fits"] = ("rejected", "3-D data (32x32x3): expected one 2-D image")

    write_light(folder / "secret.fits", seed=3)
    os.chmod(folder / "secret.fits", 0)
    expected["secret.fits"] = ("rejected", "cannot read: permission denied")

    write_light(folder / "weird.fits", seed=4, IMAGETYP="Spectrum Calibration")
    expected["weird.fits"] = ("rejected", "unknown IMAGETYP 'Spectrum Calibration'")

    shutil.copyfile(good, folder / "good_copy.fits")
    expected["good_copy.fits"] = ("duplicate", "same content as")

    data = np.random.default_rng(5).integers(900, 1100, (64, 64)).astype(np.uint16)
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, light_header())]).writeto(
        folder / "compressed.fits.fz"
    )
    expected["compressed.fits.fz"] = ("recorded", "")

    (folder / "capture.fits.tmp").write_bytes(blob)  # a temporary name: not a frame yet
    return expected


def _ingest_command(tmp: Path) -> list[str]:
    """The real CLI; as root, without the capabilities that let root read any file."""
    command = [
        sys.executable,
        "-m",
        "observd",
        "ingest",
        "--config",
        str(tmp / "observd.toml"),
        str(tmp / "camera"),
    ]
    if os.geteuid() == 0:
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *command]
    return command


def test_every_bad_file_gets_a_row_with_a_reason_and_the_run_exits_0(tmp_path):
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot test an unreadable file")
    expected = make_bad_files(tmp_path / "camera")
    write_config(tmp_path)
    run = subprocess.run(_ingest_command(tmp_path), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    with Catalog(tmp_path / "observd.sqlite", readonly=True) as cat:
        rows = {Path(r["path"]).name: r for r in cat.frames()}
        assert set(rows) == set(expected)  # the .tmp file is not a frame
        for name, (status, reason) in expected.items():
            # the ingest stage's verdict (a recorded light then goes on through the stages)
            ingest = next(e for e in cat.events(rows[name]["id"]) if e["stage"] == "ingest")
            assert ingest["action"] == status, (name, ingest["reason"])
            assert reason in (ingest["reason"] or ""), (name, ingest["reason"])
            if status != "recorded":
                assert (rows[name]["status"], rows[name]["reason"]) == (status, ingest["reason"])
            assert name in run.stderr or status == "recorded"  # each reason is logged too
        assert rows["good_copy.fits"]["duplicate_of"] == rows["good.fits"]["id"]
        assert rows["truncated.fits"]["type"] == "light"  # the header was still read
        assert rows["compressed.fits.fz"]["nx"] == 64


def test_ingest_twice_adds_nothing(tmp_path, config_file):
    camera = tmp_path / "camera"
    for i in range(3):
        write_light(camera / f"m51_{i}.fits", seed=i)
    (camera / "zero.fits").write_bytes(b"")
    assert main(["ingest", "--config", str(config_file), str(camera)]) == 0
    with Catalog(tmp_path / "observd.sqlite", readonly=True) as cat:
        first = cat.frames()
        n_events = len(cat.events())
    assert main(["ingest", "--config", str(config_file), str(camera)]) == 0
    with Catalog(tmp_path / "observd.sqlite", readonly=True) as cat:
        assert cat.frames() == first
        assert len(cat.events()) == n_events
    assert len(first) == 4


def test_a_file_changed_on_disk_is_read_again(tmp_path, config_file):
    config = load_config(config_file)
    path = write_light(tmp_path / "camera" / "a.fits")
    with Catalog(config.paths.catalog) as cat:
        first = ingest_file(path, cat, config)
        path.unlink()
        write_light(path, seed=9, FILTER="V")
        again = ingest_file(path, cat, config)
        assert again.new and again.frame_id == first.frame_id
        assert cat.frame(first.frame_id)["filter"] == "V"
        assert [e["action"] for e in cat.events(first.frame_id)] == [
            "recorded",
            "re-read",
            "recorded",
        ]


def test_the_recorded_frame_carries_its_pixels_for_the_next_stage(tmp_path, config_file):
    config = load_config(config_file)
    path = write_light(tmp_path / "camera" / "a.fits")
    with Catalog(config.paths.catalog) as cat:
        result = ingest_file(path, cat, config)
    assert result.status == "recorded"
    assert result.raw.data.shape == (64, 64) and result.raw.data.dtype == np.uint16
    assert result.info.target == "M 51" and result.info.night == "2026-03-14"


def test_vanished_file_returns_none(tmp_path, config_file):
    config = load_config(config_file)
    with Catalog(config.paths.catalog) as cat:
        assert ingest_file(tmp_path / "camera" / "gone.fits", cat, config) is None
        assert cat.frames() == []


def test_unreadable_path_exits_nonzero_with_reason(capsys, tmp_path, config_file):
    assert main(["ingest", "--config", str(config_file), str(tmp_path / "nowhere")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_find_frame_files_skips_temporary_and_other_names(tmp_path, config_file):
    config = load_config(config_file)
    for name in ("a.fits", "b.FIT", "c.fits.fz", "d.fits.tmp", "e.txt", "~f.fits", ".g.fits"):
        (tmp_path / "camera" / name).write_bytes(b"x")
    (tmp_path / "camera" / "sub").mkdir()
    (tmp_path / "camera" / "sub" / "h.fts").write_bytes(b"x")
    found = [p.name for p in find_frame_files([tmp_path / "camera"], config)]
    assert found == ["a.fits", "b.FIT", "c.fits.fz", "h.fts"]


def test_status_json_lists_every_frame_with_contract_keys(capsys, tmp_path, config_file):
    expected = make_bad_files(tmp_path / "camera")
    os.chmod(tmp_path / "camera" / "secret.fits", 0o644)
    assert main(["ingest", "-q", "--config", str(config_file), str(tmp_path / "camera")]) == 0
    capsys.readouterr()
    assert main(["status", "--json", "--config", str(config_file)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["frames"]) == len(expected)
    for frame in data["frames"]:
        keys = ("path", "type", "filter", "exptime", "target", "night", "status", "reason")
        assert set(keys) <= set(frame)
        assert (frame["reason"] is None) == (frame["status"] == "recorded")
    assert main(["status", "--config", str(config_file), "--night", "2026-03-14"]) == 0
    text = capsys.readouterr().out
    assert "M 51" in text and "not used:" in text and "same content as" in text


def test_batch_order_is_observation_time_not_name(tmp_path, config_file):
    from observd.ingest import in_time_order

    config = load_config(config_file)
    camera = tmp_path / "camera"
    a = write_light(camera / "a.fits", seed=1, DATE_OBS="2026-03-15T09:00:00")
    b = write_light(camera / "b.fits", seed=2, DATE_OBS="2026-03-15T03:00:00")
    c = write_light(camera / "c.fits", seed=3, DATE_OBS="2026-03-15T06:00:00.5")
    junk = camera / "0junk.fits"
    junk.write_text("not a frame")
    assert in_time_order([junk, a, b, c], config) == [b, c, a, junk]
