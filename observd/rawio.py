"""Read one raw frame from disk, safely, or say exactly why it cannot be used.

Camera folders hold whatever the capture software left: files still being written,
truncated copies, text files with a FITS name, header-only WCS solutions, cubes. This
module reads a file once (bytes -> hash -> FITS), checks its structure against what
its header promises, and returns the image or raises :class:`BadFrame` with a reason
an operator can act on. It never writes to the file.

The SHA-256 of the bytes is computed in a worker thread (hashlib releases the GIL) as
they are read, and while the FITS structure is parsed and the pixels converted; the
camera's usual layout (16-bit unsigned stored as int16 + BZERO 32768) is converted from
the bytes read in one compiled pass that also finds the extremes. At 4096 px the hash is
most of the cost.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import os
import queue
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from numba import njit

__all__ = ["BadFrame", "RawFrame", "read_raw"]

_BLOCK = 2880


class BadFrame(Exception):
    """A file that cannot be used as a frame.

    ``reason`` is the operator-facing sentence; ``header`` is the image header when it
    could still be read (a truncated file usually has an intact header), so the catalog
    can say what the frame was meant to be.
    """

    def __init__(
        self,
        reason: str,
        *,
        header: fits.Header | None = None,
        sha256: str | None = None,
        size: int | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.header = header
        self.sha256 = sha256
        self.size = size


@dataclass
class RawFrame:
    """One raw frame as read from disk."""

    path: Path
    size: int
    mtime_ns: int
    sha256: str
    header: fits.Header  # the image header (for tile-compressed files, the image's own)
    data: np.ndarray  # 2-D, values after BSCALE/BZERO (uint16 for BZERO=32768 files)
    hdu_index: int


def read_raw(path: str | os.PathLike[str]) -> RawFrame:
    """Read a raw frame and check it is a usable 2-D image.

    Parameters
    ----------
    path
        A FITS file, optionally gzip/bzip2 compressed or tile-compressed (``.fits.fz``).

    Returns
    -------
    RawFrame

    Raises
    ------
    BadFrame
        With a one-line reason: empty, unreadable, not FITS, truncated, no image,
        not 2-D, no valid pixels, constant.
    FileNotFoundError
        When the file vanished (the caller decides; it is not a property of the frame).
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            stat = os.fstat(fh.fileno())
            blob, digest = _read_hashing(fh, stat.st_size)
    except PermissionError:
        raise BadFrame("cannot read: permission denied") from None
    except IsADirectoryError:
        raise BadFrame("is a folder, not a file") from None
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise BadFrame(f"cannot read: {exc.strerror or exc}") from None

    size = len(blob)
    if size == 0:
        raise BadFrame("empty file (0 bytes)", sha256=digest.result(), size=0)
    try:
        header, data, index = _parse(blob, size)
    except BadFrame as bad:
        bad.sha256 = digest.result()
        raise
    return RawFrame(
        path=path,
        size=size,
        mtime_ns=stat.st_mtime_ns,
        sha256=digest.result(),
        header=header,
        data=data,
        hdu_index=index,
    )


def _parse(file_blob: memoryview, size: int) -> tuple[fits.Header, np.ndarray, int]:
    """The image header, pixels and HDU index of a file's bytes, or :class:`BadFrame`
    (without its hash: :func:`read_raw` adds it)."""
    sha256 = None
    blob = _decompress(file_blob, sha256, size)
    if bytes(blob[:9]) != b"SIMPLE  =":
        raise BadFrame(f"not a FITS file (begins with {_preview(blob)})", sha256=sha256, size=size)

    extremes = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bad cards are reported by headers.describe
        try:
            hdul = fits.open(_open_buffer(blob), memmap=False, lazy_load_hdus=False)
        except Exception as exc:  # astropy raises OSError/ValueError/IndexError variously
            raise BadFrame(_header_reason(exc, size), sha256=sha256, size=size) from None
        try:
            index, hdu = _image_hdu(hdul)
            header = hdu.header
            if index is None:
                raise BadFrame(
                    "no image data (header only)", header=header, sha256=sha256, size=size
                )
            _check_complete(hdul, index, hdu, len(blob), header, sha256, size)
            fast = _unsigned16(hdu, header, blob, hdul.fileinfo(index)["datLoc"])
            if fast is None:
                data = _load_data(hdu, header, sha256, size)
            else:
                data, extremes = fast
        finally:
            hdul.close()

    data = _check_shape(data, header, sha256, size)
    _check_values(data, header, sha256, size, extremes)
    return header, data, index


def _read_hashing(fh: io.BufferedReader, size_hint: int) -> tuple[memoryview, Future[str]]:
    """All the bytes of a file, and their SHA-256 computed in a worker thread as they
    arrive (the reading and the hashing overlap; hashlib releases the GIL). The bytes are
    read once, into one buffer, which the FITS parser and the pixel conversion then read."""
    global _HASHER
    with _HASHER_LOCK:
        if _HASHER is None:
            _HASHER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="observd-sha256")
    chunks: queue.SimpleQueue[bytes | memoryview | None] = queue.SimpleQueue()
    digest = _HASHER.submit(_sha256, chunks)
    view = memoryview(np.empty(size_hint, dtype=np.uint8))  # not zeroed first, as bytearray is
    done = 0
    try:
        while done < size_hint:
            n = fh.readinto(view[done : done + _CHUNK])
            if not n:  # shorter than it was a moment ago
                view = view[:done]
                break
            chunks.put(view[done : done + n])
            done += n
        more = fh.read() if done == size_hint else b""  # it grew meanwhile
        if more:
            chunks.put(more)
            view = memoryview(view.tobytes() + more)
    finally:
        chunks.put(None)  # always: the worker must not wait for ever
    return view, digest


def _sha256(chunks: queue.SimpleQueue[bytes | memoryview | None]) -> str:
    sha = hashlib.sha256()
    while (part := chunks.get()) is not None:
        sha.update(part)
    return sha.hexdigest()


_CHUNK = 4 << 20
_HASHER: ThreadPoolExecutor | None = None
_HASHER_LOCK = threading.Lock()


def _forget_hasher() -> None:
    """A forked child has none of the parent's threads: it starts its own pool."""
    global _HASHER, _HASHER_LOCK
    _HASHER, _HASHER_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_hasher)


def _unsigned16(hdu, header, blob: bytes, offset: int) -> tuple[np.ndarray, tuple] | None:
    """The pixels of an uncompressed 16-bit unsigned image (int16 + BZERO 32768, BSCALE 1),
    and their minimum and maximum, straight from the bytes read; None for any other
    layout (astropy reads those). The values are astropy's, without its copies."""
    if type(hdu) not in (fits.PrimaryHDU, fits.ImageHDU):
        return None
    naxis = header.get("NAXIS", 0)
    if not isinstance(naxis, int) or naxis < 1:
        return None
    naxes = [header.get(f"NAXIS{i}", 0) for i in range(1, naxis + 1)]
    if not all(isinstance(n, int) and n > 0 for n in naxes):
        return None
    if (
        header.get("BITPIX") != 16
        or header.get("BZERO", 0) != 32768
        or header.get("BSCALE", 1) != 1
        or not getattr(hdu, "_uint", True)
    ):
        return None
    count = int(np.prod(naxes, dtype=np.int64))
    stored = np.frombuffer(blob, dtype=np.uint16, count=count, offset=offset)
    out = np.empty(count, dtype=np.uint16)
    lo, hi = _unsigned16_kernel(stored, out)
    return out.reshape(naxes[::-1]), (np.uint16(lo), np.uint16(hi))


@njit(cache=True, nogil=True)
def _unsigned16_kernel(stored, out):
    """Big-endian int16 read as native uint16 -> the unsigned value (swap the bytes, flip
    the sign bit: exactly + 32768), and the minimum and maximum. One thread: the other
    core hashes meanwhile. Compiled on first use (numba, cached on disk)."""
    eight = np.uint16(8)
    lo = np.uint16(65535)
    hi = np.uint16(0)
    for j in range(stored.size):
        x = stored[j]
        v = np.uint16(np.uint16(x >> eight) | np.uint16(x << eight)) ^ np.uint16(0x8000)
        out[j] = v
        lo = min(lo, v)
        hi = max(hi, v)
    return lo, hi


def _open_buffer(blob: bytes | memoryview) -> io.BufferedReader | io.BytesIO:
    """A file object over the bytes, for astropy, without copying them (``io.BytesIO``
    copies anything but ``bytes``)."""
    if isinstance(blob, bytes):
        return io.BytesIO(blob)
    return io.BufferedReader(_BufferFile(blob))


class _BufferFile(io.RawIOBase):
    """A read-only, seekable raw file over a buffer."""

    def __init__(self, buffer: memoryview) -> None:
        super().__init__()
        self._buffer = buffer.cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        start = min(self._pos, len(self._buffer))
        part = self._buffer[start : start + len(target)]
        target[: len(part)] = part
        self._pos = start + len(part)
        return len(part)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._buffer)}[whence]
        if base + offset < 0:
            raise OSError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


def _decompress(blob: memoryview, sha256: str, size: int) -> bytes | memoryview:
    try:
        if bytes(blob[:2]) == b"\x1f\x8b":
            return gzip.decompress(blob)
        if bytes(blob[:3]) == b"BZh":
            return bz2.decompress(blob)
    except (OSError, EOFError, ValueError) as exc:
        raise BadFrame(f"corrupt compressed file ({exc})", sha256=sha256, size=size) from None
    return blob


def _preview(blob: bytes | memoryview) -> str:
    head = bytes(blob[:24])
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return repr(head.decode("ascii").split("\n")[0])
    return "binary bytes " + head[:8].hex(" ")


def _header_reason(exc: Exception, size: int) -> str:
    text = str(exc)
    if "END" in text:
        return f"truncated or corrupt header: no END card in {size} bytes"
    return f"unreadable FITS structure ({text.splitlines()[0][:160]})"


def _image_hdu(hdul: fits.HDUList) -> tuple[int | None, fits.hdu.base.ExtensionHDU]:
    """The first HDU holding an image: the primary, or a (compressed) image extension."""
    for index, hdu in enumerate(hdul):
        if isinstance(hdu, fits.CompImageHDU) or (
            isinstance(hdu, fits.PrimaryHDU | fits.ImageHDU) and hdu.header.get("NAXIS", 0) > 0
        ):
            return index, hdu
    return None, hdul[0]


def _check_complete(hdul, index, hdu, length, header, sha256, size) -> None:
    """Compare the bytes on disk with what the header promises (not for compressed tiles,
    whose table length astropy checks itself)."""
    info = hdul.fileinfo(index)
    if isinstance(hdu, fits.CompImageHDU):
        return
    bitpix = abs(int(header.get("BITPIX", 8)))
    naxes = [int(header.get(f"NAXIS{i}", 0)) for i in range(1, int(header.get("NAXIS", 0)) + 1)]
    need = info["datLoc"] + bitpix // 8 * int(np.prod(naxes, dtype=np.int64))
    if length < need:
        raise BadFrame(
            f"truncated data: file has {length} bytes, its header needs {need}",
            header=header,
            sha256=sha256,
            size=size,
        )


def _load_data(hdu, header, sha256, size) -> np.ndarray:
    try:
        data = hdu.data
    except Exception as exc:
        text = str(exc).splitlines()[0][:160]
        reason = "truncated data" if "too small" in text else f"unreadable pixel data ({text})"
        raise BadFrame(reason, header=header, sha256=sha256, size=size) from None
    if data is None:
        raise BadFrame("no image data (header only)", header=header, sha256=sha256, size=size)
    return data


def _check_shape(data: np.ndarray, header, sha256, size) -> np.ndarray:
    if data.ndim > 2:
        squeezed = np.squeeze(data)
        if squeezed.ndim == 2:
            return squeezed
        shape = "x".join(str(n) for n in data.shape[::-1])
        raise BadFrame(
            f"{data.ndim}-D data ({shape}): expected one 2-D image",
            header=header,
            sha256=sha256,
            size=size,
        )
    if data.ndim < 2 or min(data.shape) < 2:
        raise BadFrame(
            f"not a 2-D image (shape {data.shape})", header=header, sha256=sha256, size=size
        )
    return data


def _check_values(data: np.ndarray, header, sha256, size, extremes=None) -> None:
    if extremes is not None:  # already known
        lo, hi = extremes
    elif data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.any():
            raise BadFrame(
                "no valid pixels (all NaN or infinite)", header=header, sha256=sha256, size=size
            )
        lo, hi = (
            np.min(data, where=finite, initial=np.inf),
            np.max(data, where=finite, initial=-np.inf),
        )
    else:
        lo, hi = data.min(), data.max()
    if lo == hi:
        raise BadFrame(
            f"constant image: every pixel is {lo:g}", header=header, sha256=sha256, size=size
        )
