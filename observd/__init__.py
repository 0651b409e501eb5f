"""observd: the unattended pipeline beside a university telescope.

Importing the package configures astropy for a machine with no internet: the dome PC
must never stall on an IERS or data download in the middle of the night. It also asks
numba for a thread-safe threading layer (TBB, from the ``tbb`` dependency, or OpenMP):
the compiled kernels run on the pipeline thread while the copier thread computes a
warming-up coadd's picture with others, and numba's fallback layer aborts the process
when two threads launch parallel kernels at once.
"""

from __future__ import annotations

import os
import sys

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


def _numba_threadsafe() -> None:
    if "numba" in sys.modules:  # imported first by the application: set it there
        import numba

        if numba.config.THREADING_LAYER == "default":
            numba.config.THREADING_LAYER = "threadsafe"
    else:
        os.environ.setdefault("NUMBA_THREADING_LAYER", "threadsafe")


_numba_threadsafe()
