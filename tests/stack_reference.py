"""The running coadd's outlier rule written plainly in numpy, on whole arrays.

observd runs it as compiled kernels (``observd.stack._flag_kernel`` for the warm-up,
``_screen_kernel`` + ``_decide_kernel`` for the running add); this is the readable
statement of the same rule (see the module doc of :mod:`observd.stack`), which the tests
hold the kernels to, pixel for pixel. It was observd's own code before the kernels.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from observd.stack import _Frame, _Rules

F32 = np.float32


def outliers(
    rules: _Rules,
    fr: _Frame,
    x: NDArray[np.float32],
    m: NDArray[np.float32],
    var0: NDArray[np.float32],
    q: float,
    s2m_at: Callable[[NDArray[np.intp]], NDArray[np.float32]],
) -> tuple[NDArray[np.bool_], NDArray[np.float32] | None]:
    """Compare frame ``x`` with reference ``m`` (whole arrays; NaN = no data).

    The reference's variance is ``var0 * (1 + q * m+)`` (``var0``: its background
    variance) and its PSF ``sigma^2`` at flat pixel indices ``s2m_at(i)``. A cheap
    screen over the whole chunk (``|x - m|`` beyond ``clip`` sigma of the background
    noise alone) leaves the few candidates -- star cores, cosmic rays -- for the full
    model (:func:`_judge`). Returns the outliers (grown) and, when there are any, the
    signed plain significance ``(x - m) / sd`` at them (0 elsewhere).
    """
    r = x - m  # NaN where either has no data: every comparison below is then False
    thr = var0 + F32(fr.bg2)
    thr *= F32(rules.clip * rules.clip)
    r *= r
    ci = np.flatnonzero(r > thr)
    flag = np.zeros(x.shape, bool)
    if ci.size == 0:
        return flag, None

    def at(i: NDArray[np.intp]) -> tuple[NDArray[np.float32], ...]:
        return x.flat[i], m.flat[i], var0.flat[i], s2m_at(i)

    hi, zh = _judge(rules, fr, ci, at, x.shape, q)
    if hi.size == 0:
        return flag, None
    flag.flat[hi] = True
    zs = np.zeros(x.shape, F32)
    zs.flat[hi] = zh
    return flag, zs


def _judge(
    rules: _Rules,
    fr: _Frame,
    ci: NDArray[np.intp],
    at: Callable[[NDArray[np.intp]], tuple[NDArray[np.float32], ...]],
    shape: tuple[int, int],
    q: float,
) -> tuple[NDArray[np.intp], NDArray[np.float32]]:
    """The full noise model at the screened candidates ``ci`` (flat indices into an
    array of ``shape``; ``at(i)`` gives ``x``, ``m``, ``var0`` and the reference's PSF
    ``sigma^2`` there), then the growth. Returns the outliers' flat indices (sorted) and
    their signed significance ``(x - m) / sd``."""
    xc, mc, v0c, s2 = at(ci)
    rc = xc - mc
    sd, lo = _sd(fr, q, xc, mc, v0c)
    # PSF mismatch: core term (ratio - 1) where the sharper image is the higher one,
    # wing term (ratio^2 - 1) where it is the lower one
    sx2 = F32(fr.sig2)
    s2 = np.where(np.isfinite(s2) & (s2 > 0), s2, sx2)
    ratio = np.maximum(s2, sx2) / np.minimum(s2, sx2) - F32(1.0)
    up = rc > 0
    tol = np.where(up == (sx2 < s2), ratio, ratio * (ratio + F32(2.0)))
    tol *= F32(rules.psf_margin)
    tol += F32(rules.scale_error)
    tol *= lo
    if fr.reg > 0:
        slope = _slope_at(ci, shape, at)
        slope -= F32(rules.curvature_floor) * np.sqrt(v0c)
        tol += F32(fr.reg) * np.maximum(slope, F32(0.0))
    excess = np.abs(rc) - tol
    hit = excess > F32(rules.clip) * sd
    hi = ci[hit]
    zh = rc[hit] / sd[hit]
    if hi.size == 0 or rules.grow == 0:
        return hi, zh
    near = np.unique(_window_indices(hi, shape, rules.grow, inside=True))
    j = np.minimum(np.searchsorted(hi, near), hi.size - 1)
    near = near[hi[j] != near]
    if near.size == 0:
        return hi, zh
    xn, mn, v0n, _ = at(near)
    sdn, _ = _sd(fr, q, xn, mn, v0n)
    zn = (xn - mn) / sdn  # NaN where no data: not grown into
    g = np.abs(zn) > F32(rules.grow_clip)
    idx = np.concatenate([hi, near[g]])
    z = np.concatenate([zh, zn[g]])
    order = np.argsort(idx, kind="stable")
    return idx[order], z[order]


def _sd(fr: _Frame, q: float, x: NDArray[np.float32], m: NDArray[np.float32],
        var0: NDArray[np.float32]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """The noise of ``x - m`` (background and the sources' Poisson noise) and the lower
    image ``S``."""
    lo = np.maximum(np.minimum(x, m), F32(0.0))
    var = var0 * (F32(1.0) + F32(q) * np.maximum(m, F32(0.0)))
    var += F32(fr.bg2) + F32(fr.p) * lo
    return np.sqrt(var), lo


def _window_indices(i: NDArray[np.intp], shape: tuple[int, int], r: int, *,
                    inside: bool = False) -> NDArray[np.intp]:
    """Flat indices of the ``(2r+1)^2`` square around each flat index ``i`` (one row per
    index). Off the grid, the nearest pixel on it stands in (a max over the window is
    then that of the window cut at the edge); with ``inside``, a flat array of only the
    pixels on the grid."""
    ny, nx = shape
    yy, xx = np.divmod(i, nx)
    d = np.arange(-r, r + 1)
    wy = (yy[:, None] + d[None, :])[:, :, None]
    wx = (xx[:, None] + d[None, :])[:, None, :]
    if inside:
        ok = (wy >= 0) & (wy < ny) & (wx >= 0) & (wx < nx)
        return (wy * nx + wx)[ok]
    return (np.clip(wy, 0, ny - 1) * nx + np.clip(wx, 0, nx - 1)).reshape(i.size, -1)


def _slope_at(i: NDArray[np.intp], shape: tuple[int, int],
              at: Callable[[NDArray[np.intp]], tuple[NDArray[np.float32], ...]]
              ) -> NDArray[np.float32]:
    """Half the range of ``M`` over the 3x3 neighbourhood of flat indices ``i`` (the
    steepest slope there, px^-1); where ``M`` has no data ``x`` stands in, and pixels
    with neither are left out (no false cliff at a saturated core)."""
    j = _window_indices(i, shape, 1)
    x, m = at(j.reshape(-1))[:2]
    vals = np.where(np.isnan(m), x, m).reshape(j.shape)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all NaN: no slope (NaN)
        out = np.nanmax(vals, axis=1) - np.nanmin(vals, axis=1)
    out *= F32(0.5)
    return out
