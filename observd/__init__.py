"""observd: the unattended pipeline beside a university telescope.

Importing the package configures astropy for a machine with no internet: the dome PC
must never stall on an IERS or data download in the middle of the night.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]


def _astropy_offline() -> None:
    try:
        from astropy.utils import iers
        from astropy.utils.data import conf as data_conf
    except ImportError:  # pragma: no cover - astropy is a hard dependency
        return
    iers.conf.auto_download = False
    iers.conf.auto_max_age = None
    data_conf.allow_internet = False


_astropy_offline()
