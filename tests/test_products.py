from __future__ import annotations

import errno

import numpy as np
import pytest
from astropy.io import fits

from observd.products import Products, atomic_write, atomic_write_bytes, atomic_write_fits


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "a.bin"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["a.bin"]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.bin"
    atomic_write_bytes(target, b"old")

    def disk_full(fh):
        fh.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, disk_full)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_atomic_fits_round_trip(tmp_path):
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = atomic_write_fits(tmp_path / "m.fits", fits.PrimaryHDU(data))
    np.testing.assert_array_equal(fits.getdata(path), data)


def test_product_layout_matches_the_design():
    p = Products("/p")
    assert str(p.master("2026-03-14", "bias", "bin1x1")) == "/p/masters/2026-03-14/bias_bin1x1.fits"
    assert p.master("2026-03-14", "dark", "s", exptime=30.0).name == "dark_30s_s.fits"
    assert p.master("2026-03-14", "flat", "s", filter="R").name == "flat_R_s.fits"
    assert p.master("2026-03-14", "flat", "s", filter="r'").name == "flat_rp_s.fits"
    assert str(p.master("n", "bias", "s", version=3)) == "/p/masters/n/versions/bias_s_v3.fits"
    assert str(p.stack("2026-03-14", "M 51", "R")) == "/p/stacks/2026-03-14/m51/m51_R.fits"
    assert p.stack("n", "M 51", "R", ".png").name == "m51_R.png"
    assert str(p.rgb("n", "NGC 2903")) == "/p/stacks/n/ngc2903/ngc2903_rgb.png"
