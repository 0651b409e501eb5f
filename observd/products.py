"""Where products live, and writing them atomically.

The dome page and the morning summary read these files while the pipeline writes them,
and the machine may lose power at any moment: every write goes to a temporary file in
the same folder, is fsynced, and replaces the old file in one ``os.replace``. A reader
sees the old file or the new one, never half of one. A failed write (disk full) leaves
the old file in place and removes the temporary one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from astropy.io import fits

from observd.headers import slugify

__all__ = [
    "Products",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_fits",
]


_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK
"""Products get the mode a plain ``open()`` would give them (umask applies)."""


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> Path:
    """Write a file atomically through ``write(fileobj)``.

    Parameters
    ----------
    path
        The final file; its folder is created when missing.
    write
        Called with a binary file object open on a temporary file in the same folder.

    Returns
    -------
    Path
        The final path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp's 0600 would hide products from their readers
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_fits(path: str | os.PathLike[str], hdus: fits.HDUList | fits.PrimaryHDU) -> Path:
    """Write a FITS file atomically."""
    if isinstance(hdus, fits.PrimaryHDU):
        hdus = fits.HDUList([hdus])
    return atomic_write(path, lambda fh: hdus.writeto(fh, output_verify="silentfix"))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Products:
    """The layout of the products folder (a contract: see DESIGN.md).

    ``masters/<night>/bias_<setup>.fits``, ``dark_<exptime>s_<setup>.fits``,
    ``flat_<filter>_<setup>.fits``; superseded versions under ``masters/<night>/versions/``;
    ``stacks/<night>/<target>/<target>_<filter>.fits`` (+ ``.png``) and
    ``<target>_rgb.png``; ``summary/<night>/index.html`` and ``summary.json``.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def master(
        self,
        night: str,
        kind: str,
        setup: str,
        *,
        exptime: float | None = None,
        filter: str | None = None,
        version: int | None = None,
    ) -> Path:
        """Path of a master; ``version`` gives the archived copy of that version."""
        if kind in ("dark", "darkflat"):
            name = f"{kind}_{exptime:g}s_{setup}"
        elif kind == "flat":
            name = f"flat_{_safe(filter or 'none')}_{setup}"
        else:
            name = f"{kind}_{setup}"
        folder = self.root / "masters" / night
        if version is not None:
            return folder / "versions" / f"{name}_v{version}.fits"
        return folder / f"{name}.fits"

    def stack(self, night: str, target: str, filter: str, suffix: str = ".fits") -> Path:
        slug = slugify(target)
        return self.root / "stacks" / night / slug / f"{slug}_{_safe(filter)}{suffix}"

    def rgb(self, night: str, target: str) -> Path:
        slug = slugify(target)
        return self.root / "stacks" / night / slug / f"{slug}_rgb.png"

    def summary_dir(self, night: str) -> Path:
        return self.root / "summary" / night

    def state_dir(self) -> Path:
        """Checkpoints of running accumulators (not a product for people)."""
        return self.root / "state"


def _safe(name: str) -> str:
    """Filter names such as ``r'`` or ``H-alpha`` made file-name safe, readably."""
    return "".join(c if c.isalnum() or c in "-+" else "p" if c == "'" else "_" for c in name)
