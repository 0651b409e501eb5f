"""read_raw: the fast path for 16-bit unsigned frames gives astropy's pixels and header,
the hash is the file's, and bad files keep their reasons (with the hash)."""

from __future__ import annotations

import gzip
import hashlib
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from observd.rawio import BadFrame, read_raw


def _astropy(path: Path, index: int = 0) -> tuple[np.ndarray, fits.Header]:
    with fits.open(path, memmap=False) as hdul:
        return np.array(hdul[index].data), hdul[index].header.copy()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _u16(shape, seed=0) -> np.ndarray:
    data = np.random.default_rng(seed).integers(0, 65536, shape, dtype=np.uint16)
    data.flat[0], data.flat[-1] = 0, 65535  # both ends of the range
    return data


@pytest.mark.parametrize(
    "layout", ["primary", "cube1", "extension", "blank", "odd", "int16", "float32", "uint32", "gz"]
)
def test_pixels_header_and_hash_are_astropys(tmp_path, layout):
    data = _u16((67, 131))
    path, index = tmp_path / "f.fits", 0
    header = fits.Header({"IMAGETYP": "Light Frame", "EXPTIME": 30.0})
    if layout == "primary":
        fits.PrimaryHDU(data, header).writeto(path)
    elif layout == "cube1":
        fits.PrimaryHDU(data[None], header).writeto(path)
    elif layout == "extension":
        fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, header)]).writeto(path)
        index = 1
    elif layout == "blank":
        header["BLANK"] = 0
        fits.PrimaryHDU(data, header).writeto(path)
    elif layout == "odd":
        fits.PrimaryHDU(_u16((5, 3)), header).writeto(path)
    elif layout == "int16":
        fits.PrimaryHDU(data.astype(np.int16), header).writeto(path)
    elif layout == "float32":
        fits.PrimaryHDU(data.astype(np.float32), header).writeto(path)
    elif layout == "uint32":
        fits.PrimaryHDU(data.astype(np.uint32) * 3, header).writeto(path)
    else:
        fits.PrimaryHDU(data, header).writeto(tmp_path / "plain.fits")
        path = tmp_path / "f.fits.gz"
        path.write_bytes(gzip.compress((tmp_path / "plain.fits").read_bytes()))
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    raw = read_raw(path)
    want, want_header = _astropy(path, index)
    if want.ndim == 3:
        want = want[0]
    assert raw.data.dtype == want.dtype and raw.data.shape == want.shape
    np.testing.assert_array_equal(raw.data, want)
    assert raw.header.tostring() == want_header.tostring()
    assert raw.sha256 == _sha(path) and raw.size == len(before) and raw.hdu_index == index
    if layout in ("primary", "blank", "extension"):
        assert raw.data.dtype == np.uint16 and raw.data.flags.writeable
        raw.data[0, 0] = 1  # the pixels are the caller's to change...
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime  # ...not the file


def test_bad_files_keep_their_reasons_and_hash(tmp_path):
    good = tmp_path / "good.fits"
    fits.PrimaryHDU(_u16((64, 64))).writeto(good)
    blob = good.read_bytes()
    cases = {
        "trunc.fits": (blob[:-3000], "truncated data: file has"),
        "notfits.fits": (b"Observing log\nseeing 2\n", "not a FITS file (begins with 'Observing"),
        "noend.fits": (blob[:2000], "unreadable FITS structure"),
        "badgz.fits.gz": (gzip.compress(blob)[:100], "corrupt compressed file"),
    }
    const = tmp_path / "const.fits"
    fits.PrimaryHDU(np.full((8, 8), 7, np.uint16)).writeto(const)
    cases["const.fits"] = (const.read_bytes(), "constant image: every pixel is 7")
    for name, (content, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(BadFrame) as info:
            read_raw(path)
        assert info.value.reason.startswith(reason), (name, info.value.reason)
        assert info.value.sha256 == hashlib.sha256(content).hexdigest()
        assert info.value.size == len(content)
        assert path.read_bytes() == content
    (tmp_path / "zero.fits").write_bytes(b"")
    with pytest.raises(BadFrame, match="empty file"):
        read_raw(tmp_path / "zero.fits")
    if os.geteuid() != 0:  # root reads anything
        os.chmod(good, 0)
        with pytest.raises(BadFrame, match="permission denied"):
            read_raw(good)


def test_frames_read_from_several_threads_get_their_own_hash(tmp_path):
    paths = []
    for i in range(6):
        path = tmp_path / f"f{i}.fits"
        fits.PrimaryHDU(_u16((200, 180), seed=i)).writeto(path)
        paths.append(path)
    with ThreadPoolExecutor(3) as pool:
        frames = list(pool.map(read_raw, paths * 2))
    for path, raw in zip(paths * 2, frames, strict=True):
        assert raw.sha256 == _sha(path)
        np.testing.assert_array_equal(raw.data, _astropy(path)[0])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_can_still_read(tmp_path):
    """The hashing threads do not survive a fork: the child must start its own."""
    path = tmp_path / "f.fits"
    fits.PrimaryHDU(_u16((50, 40))).writeto(path)
    want = read_raw(path).sha256  # the parent's hashing pool exists now
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        ok = read_raw(path).sha256 == want
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung reading a frame")


def test_a_file_that_grows_or_shrinks_while_read_is_read_to_its_end(tmp_path):
    """The buffer is sized from fstat; a file still changing gets all its bytes anyway."""
    from observd.rawio import _read_hashing

    content = np.random.default_rng(0).bytes(3 * 2880 + 17)
    path = tmp_path / "f.fits"
    path.write_bytes(content)
    for hint in (0, 100, len(content) - 1, len(content), len(content) + 5000):
        with open(path, "rb") as fh:
            view, digest = _read_hashing(fh, hint)
        assert bytes(view) == content, hint
        assert digest.result() == hashlib.sha256(content).hexdigest(), hint
