"""Registration: put every light of a target onto that target's reference grid.

The first accepted light of a target (any filter) defines the target's :class:`Grid`: its
pixel grid padded by ``pad`` on each side so that drift, dithers and a meridian flip stay
inside, and its brightest stars (in grid coordinates). All filters of the target land on
that grid, so colour composites need no second registration.

:func:`align` finds the 2x3 affine ``matrix`` (frame pixel -> grid pixel) of a later frame
from its star list, in two ways:

``"wcs"``
    Both the grid and the frame carry a WCS. The header pair predicts where the frame's
    stars fall on the grid, which finds the star pairs at once; it is *verified* against
    them: the header's map and the star fit must agree to < 0.5 px (median over at least
    ``min_matches`` stars) and < 1 px at the frame corners. A plate solution off by a few
    pixels or a fraction of a degree (a common failure) is detected and never used.
``"stars"``
    Otherwise, a triangle-invariant matcher (Groth 1986; Valdes et al. 1995, the idea behind
    astroalign): triangles of bright stars are compared by their side ratios, which do not
    change under shift, rotation (a 180 deg meridian flip included) or scale; every matched
    triangle pair votes for a similarity transform, and the densest clusters of votes are
    tried. It is deterministic, needs no image, and works on a few stars or a small overlap.

Either way the final matrix is a weighted least-squares fit on *all* mutually-nearest star
pairs, iterated with a shrinking match radius and sigma clipping: this refinement, not the
first guess, reaches a few thousandths of a pixel on good frames. A match is accepted only
with at least ``min_matches`` pairs *and* a Poisson probability below 1e-10 of that many
pairs arising by chance, given the local density of reference stars (the search tries
~1e8 transforms; random star lists do reach 6-9 pairs). A frame that cannot be matched
raises :class:`NoAlignment` whose ``reason`` starts with ``"no alignment"``.

:func:`warp` resamples a frame onto the grid with ``cv2.warpAffine`` (bicubic by default:
no measurable widening of 2.7 px stars against ~6 % for bilinear, at a quarter of
Lanczos' cost), only over the frame's footprint, with masked and non-finite pixels filled
before the cubic kernel sees them (no ringing around holes) and warped into a weight map.
cv2 resamples at 1/32 px steps: a shift error of at most 0.016 px.
:func:`reproject_to_grid` is for the rare frame whose projection really differs (another
camera, another night's grid), where an affine map is not enough.

The grid's WCS is only trusted once two independent headers agree on it
(:func:`update_grid_wcs`): a single plate solution, the reference frame's included, may be
off by pixels, and a coadd with a wrong WCS is worse than one without.
"""

from __future__ import annotations

import itertools
import math
import weakref
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Protocol

import cv2
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from numpy.typing import ArrayLike, NDArray
from scipy.spatial import ConvexHull, QhullError, cKDTree
from scipy.stats import poisson

__all__ = [
    "Alignment",
    "Grid",
    "NoAlignment",
    "align",
    "make_grid",
    "reference_alignment",
    "reproject_to_grid",
    "update_grid_wcs",
    "warp",
]

F64 = np.float64

#: A frame WCS must predict the stars to this median residual (px) to be used.
WCS_TOLERANCE = 0.5
#: ... and agree with the star fit to this many px at the frame corners.
WCS_CORNER_TOLERANCE = 1.0

_KERNELS = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
}
# Triangle matching attempts, cheapest first: (frame stars, reference stars, side-ratio
# tolerance), all triangles of the brightest of each; the last one is for noisy centroids.
_ATTEMPTS = ((25, 25, 0.01), (40, 60, 0.01), (25, 100, 0.01), (30, 40, 0.03))
_MIN_SIDE = 8.0  # px: shorter triangle sides give ratios too noisy to compare
_VOTE_ROT = 1.5  # deg: bin width of a vote in rotation (at a tolerance of 0.01)
_VOTE_SHIFT = 6.0  # px: bin width of a vote in the position of the frame centre (ditto)
_REFINE_RADII = (4.0, 2.5, 1.5)  # px: match radius of the successive refinement fits
# px: the final match radius is 3.5 sigma of the residuals, within these bounds
_FINAL_RADIUS = (1.0, 2.5)
_LOCAL_RADIUS = 40.0  # px: neighbourhood for the local density of reference stars
_FALSE_MATCH = 1e-10  # largest accepted Poisson probability of the matches being chance
_DENSE_BAD = 0.02  # above this fraction of bad pixels, fill with whole-image passes
_DENSE_WEIGHT = 0.002  # ... and above this one, weight with a warp of the bad-pixel mask


class StarList(Protocol):
    """What :func:`align` and :func:`make_grid` need of a star list (``quality.Stars``)."""

    x: NDArray[Any]
    y: NDArray[Any]
    flux: NDArray[Any]


class NoAlignment(Exception):
    """A frame that cannot be put on its target's grid; ``reason`` says why, for the catalog."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Grid:
    """A target's reference pixel grid, shared by all its filters.

    Parameters
    ----------
    shape
        ``(ny, nx)``: the reference frame padded by ``pad`` px on each side.
    pad
        ``(pad_y, pad_x)``: reference-frame pixel ``(x, y)`` sits at grid
        ``(x + pad_x, y + pad_y)``.
    wcs
        Celestial WCS of the grid once verified (two independent headers agreed), else None.
        This is what a coadd may carry.
    ref_x, ref_y, ref_flux
        Reference stars in grid coordinates, brightest first.
    wcs_candidate
        An unverified WCS (the reference frame's own header, or the latest frame header
        carried onto the grid): used to *try* the WCS path, never written into a product.
    ref_index
        For each reference star, its index in the star list the grid was made from (the
        reference frame's own alignment pairs them); None for a grid read back from the
        catalog.
    """

    shape: tuple[int, int]
    pad: tuple[int, int]
    wcs: WCS | None
    ref_x: NDArray[np.float64]
    ref_y: NDArray[np.float64]
    ref_flux: NDArray[np.float64]
    wcs_candidate: WCS | None = None
    ref_index: NDArray[np.intp] | None = None

    @property
    def frame_shape(self) -> tuple[int, int]:
        """Shape of the reference frame (the grid without its padding)."""
        return (self.shape[0] - 2 * self.pad[0], self.shape[1] - 2 * self.pad[1])

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (WCS as a FITS header string) for the catalog."""
        return {
            "shape": [int(v) for v in self.shape],
            "pad": [int(v) for v in self.pad],
            "wcs": _wcs_to_str(self.wcs),
            "wcs_candidate": _wcs_to_str(self.wcs_candidate),
            "ref_x": [float(v) for v in self.ref_x],
            "ref_y": [float(v) for v in self.ref_y],
            "ref_flux": [float(v) for v in self.ref_flux],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Grid:
        """Inverse of :meth:`to_dict`."""
        shape = (int(d["shape"][0]), int(d["shape"][1]))
        return cls(
            shape=shape,
            pad=(int(d["pad"][0]), int(d["pad"][1])),
            wcs=_wcs_from_str(d.get("wcs"), shape),
            ref_x=np.asarray(d["ref_x"], dtype=F64),
            ref_y=np.asarray(d["ref_y"], dtype=F64),
            ref_flux=np.asarray(d["ref_flux"], dtype=F64),
            wcs_candidate=_wcs_from_str(d.get("wcs_candidate"), shape),
        )


def make_grid(
    shape: tuple[int, int],
    stars: StarList,
    *,
    wcs: WCS | None = None,
    pad_fraction: float = 0.1,
    wcs_verified: bool = False,
) -> Grid:
    """The grid defined by a target's first accepted light.

    Parameters
    ----------
    shape
        ``(ny, nx)`` of the reference frame.
    stars
        Its stars (0-based frame pixels; ``quality.Stars`` or anything with ``x, y, flux``).
    wcs
        Its WCS, if any. Kept as the grid's *candidate* WCS until another frame's header
        confirms it (:func:`update_grid_wcs`), unless ``wcs_verified``.
    pad_fraction
        Padding on each side as a fraction of the frame size: room for drift, dithers and
        the re-centring after a meridian flip (the simulator's drift stays under 5 %).
    wcs_verified
        Trust ``wcs`` at once (e.g. a grid rebuilt from a verified coadd).

    Returns
    -------
    Grid
    """
    ny, nx = int(shape[0]), int(shape[1])
    if ny < 1 or nx < 1:
        raise ValueError(f"bad frame shape {shape}")
    if pad_fraction < 0:
        raise ValueError("pad_fraction must be >= 0")
    pad_y, pad_x = int(round(pad_fraction * ny)), int(round(pad_fraction * nx))
    gshape = (ny + 2 * pad_y, nx + 2 * pad_x)
    x, y, flux, index = _star_arrays(stars)
    gw = _shift_wcs(wcs, pad_x, pad_y, gshape) if wcs is not None else None
    return Grid(
        shape=gshape,
        pad=(pad_y, pad_x),
        wcs=gw if wcs_verified else None,
        ref_x=x + pad_x,
        ref_y=y + pad_y,
        ref_flux=flux,
        wcs_candidate=None if wcs_verified else gw,
        ref_index=index,
    )


# --------------------------------------------------------------------------------------
# The alignment
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Alignment:
    """Where a frame lands on its target's grid.

    Parameters
    ----------
    matrix
        2x3 float64: frame pixel ``(x, y, 1)`` -> grid pixel, ready for
        ``cv2.warpAffine(frame, matrix, (nx, ny))``.
    method
        ``"wcs"`` (header pair verified against the stars), ``"stars"`` (triangle
        matching) or ``"reference"`` (the frame that defined the grid).
    rms
        Root-mean-square residual of the matched stars after the fit, px.
    n_matches
        Number of matched star pairs used in the fit.
    dx, dy
        Position of the frame centre on the grid minus the grid centre, px (for the same
        camera: the pointing offset from the reference frame).
    rotation_deg
        Rotation of the frame against the grid, counter-clockwise in (x, y), -180..180.
    scale
        ``sqrt(|det|)`` of the linear part (1 for the same camera).
    flipped
        ``|rotation_deg| > 90``: the other side of the pier.
    matched_ref, matched_frame
        Index arrays into ``grid.ref_*`` and into the frame's (flux-sorted) star list.
    footprint_fraction
        Fraction of the grid covered by the frame.
    star_coverage
        Area of the convex hull of the matched stars over the frame area: small values mean
        the transform is extrapolated far from the stars that fixed it.
    wcs_residual
        Median distance (px) between where the frame's header (with the grid's) and the
        star fit put the matched stars; None when there was no header pair. Above 0.5 px the
        header was not used; a header can also fail on a rotation error that shows only
        at the frame corners (> 1 px there).
    grid_wcs
        The frame's WCS carried onto the grid by this alignment (for
        :func:`update_grid_wcs`), or None.
    projection_residual
        Largest departure (px) over the frame of the header pair from an affine map; None
        without a header pair. Above ~0.1 px the projections truly differ (another camera,
        another night's grid): :func:`reproject_to_grid` is the right resampler.
    """

    matrix: NDArray[np.float64]
    method: str
    rms: float
    n_matches: int
    dx: float
    dy: float
    rotation_deg: float
    scale: float
    flipped: bool
    matched_ref: NDArray[np.intp]
    matched_frame: NDArray[np.intp]
    footprint_fraction: float = 1.0
    star_coverage: float = 1.0
    wcs_residual: float | None = None
    grid_wcs: WCS | None = field(default=None, repr=False)
    projection_residual: float | None = None

    def apply(self, x: ArrayLike, y: ArrayLike) -> tuple[NDArray[F64], NDArray[F64]]:
        """Frame pixel coordinates -> grid pixel coordinates."""
        return _apply(self.matrix, np.asarray(x, dtype=F64), np.asarray(y, dtype=F64))

    def to_dict(self) -> dict[str, Any]:
        """The scalars and the matrix, JSON-able, for the catalog and the dome page."""
        return {
            "matrix": [[float(v) for v in row] for row in self.matrix],
            "method": self.method,
            "rms": float(self.rms),
            "n_matches": int(self.n_matches),
            "dx": float(self.dx),
            "dy": float(self.dy),
            "rotation_deg": float(self.rotation_deg),
            "scale": float(self.scale),
            "flipped": bool(self.flipped),
            "footprint_fraction": float(self.footprint_fraction),
            "star_coverage": float(self.star_coverage),
            "wcs_residual": None if self.wcs_residual is None else float(self.wcs_residual),
            "projection_residual": None if self.projection_residual is None
            else float(self.projection_residual),
        }


def reference_alignment(grid: Grid) -> Alignment:
    """The alignment of the frame that defined ``grid``: a pure shift by the padding.

    Use it for the reference frame instead of :func:`align`, which would compare the
    frame's header with itself and call that a verification.
    """
    pad_y, pad_x = grid.pad
    m = np.array([[1.0, 0.0, pad_x], [0.0, 1.0, pad_y]])
    idx = np.arange(grid.ref_x.size)
    # reference star j is the frame's star ref_index[j] (the grid sorted them by flux)
    frame_idx = grid.ref_index if grid.ref_index is not None else idx
    ny, nx = grid.frame_shape
    return Alignment(m, "reference", 0.0, int(idx.size), 0.0, 0.0, 0.0, 1.0, False, idx,
                     frame_idx,
                     _footprint_fraction(m, (ny, nx), grid.shape),
                     _hull_fraction(grid.ref_x, grid.ref_y, (ny, nx)))


def align(
    stars: StarList,
    grid: Grid,
    *,
    frame_shape: tuple[int, int],
    wcs: WCS | None = None,
    min_matches: int = 6,
    max_scale_error: float = 0.05,
    model: str = "similarity",
) -> Alignment:
    """Find the transform of a frame onto ``grid`` from its stars (and its WCS, if verified).

    Parameters
    ----------
    stars
        The frame's stars, 0-based pixels (``quality.Stars``).
    grid
        The target's grid.
    frame_shape
        ``(ny, nx)`` of the frame.
    wcs
        The frame's WCS from its header, if any; used only when it agrees with the stars.
    min_matches
        Fewest matched stars for a transform to be accepted.
    max_scale_error
        Largest accepted ``|scale - 1|``: frames of the same camera. Another camera or
        a different projection goes through :func:`reproject_to_grid`.
    model
        ``"similarity"`` (rotation, scale, shift: what a same-camera frame does; robust
        with few stars) or ``"affine"`` (adds shear and anisotropic scale).

    Returns
    -------
    Alignment

    Raises
    ------
    NoAlignment
        Too few stars, or no transform that at least ``min_matches`` stars agree on.
    """
    if model not in ("similarity", "affine"):
        raise ValueError(f"model must be 'similarity' or 'affine', not {model!r}")
    fx, fy, fflux, findex = _star_arrays(stars)
    n = fx.size
    if n < min_matches:
        raise NoAlignment(f"no alignment: {n} stars, need >= {min_matches}")
    if grid.ref_x.size < min_matches:
        raise NoAlignment(f"no alignment: the grid has {grid.ref_x.size} reference stars, "
                          f"need >= {min_matches}")
    ref = _ref_cache(grid)
    frame = np.column_stack([fx, fy])
    fnoise = _noise_terms(fflux)
    shape = (int(frame_shape[0]), int(frame_shape[1]))
    method = "stars"
    fit: _Fit | None = None
    wcs_residual: float | None = None
    m_wcs: NDArray[F64] | None = None
    projection: float | None = None
    gw = grid.wcs if grid.wcs is not None else grid.wcs_candidate
    if wcs is not None and gw is not None:
        pair = _wcs_affine(wcs, gw, shape)
        if pair is not None:
            m_wcs, projection = pair
            fit, wcs_residual = _align_wcs(m_wcs, frame, fnoise, ref, shape, min_matches,
                                           model)
            if fit is not None:
                method = "wcs"
    if fit is None:
        fit, best, radius = _align_stars(frame, fnoise, ref, shape, min_matches,
                                         max_scale_error, model)
        if fit is None:
            raise NoAlignment(f"no alignment: no consistent match (best {best} of {n} stars "
                              f"within {radius:.1f} px)")
        if m_wcs is not None:  # how far off the rejected header is, for the catalog
            wcs_residual = _wcs_error(m_wcs, fit, frame)
    scale = math.sqrt(abs(np.linalg.det(fit.matrix[:, :2])))
    if abs(scale - 1.0) > max_scale_error:
        raise NoAlignment(f"no alignment: scale {scale:.3f} is not that of this camera")
    grid_wcs = None
    if wcs is not None:
        try:
            grid_wcs = _carry_wcs(wcs, fit.matrix, shape, grid.shape)
        except (ValueError, np.linalg.LinAlgError):  # pragma: no cover - exotic headers
            grid_wcs = None
    alignment = _make_alignment(fit, method, shape, grid, wcs_residual, grid_wcs)
    # the matched stars as indices into the caller's star list, not the sorted copy
    return replace(alignment, matched_frame=findex[alignment.matched_frame],
                   projection_residual=projection)


def update_grid_wcs(grid: Grid, alignment: Alignment) -> Grid:
    """Fold what one aligned frame says about the grid's WCS into the grid.

    A header is trusted once a second, independent one agrees with it: when a frame's WCS
    verified against the candidate (``method == "wcs"``), or when a frame's header, carried
    onto the grid by its star alignment, matches the candidate. A candidate that a later
    header contradicts is replaced by that header (if the newcomer is the wrong one, the
    next frame will say so). A verified WCS is never changed.

    Returns
    -------
    Grid
        ``grid`` itself when nothing changed.
    """
    if grid.wcs is not None or alignment.method == "reference":
        return grid
    cand = grid.wcs_candidate
    if alignment.method == "wcs" and cand is not None:
        return replace(grid, wcs=cand, wcs_candidate=None)
    new = alignment.grid_wcs
    if new is None:
        return grid
    if cand is not None:
        med, worst = _wcs_disagreement(cand, new, grid)
        if med < WCS_TOLERANCE and worst < WCS_CORNER_TOLERANCE:
            return replace(grid, wcs=cand, wcs_candidate=None)
    return replace(grid, wcs_candidate=new)


# --------------------------------------------------------------------------------------
# Warping
# --------------------------------------------------------------------------------------


def warp(
    image: ArrayLike,
    alignment: Alignment,
    grid: Grid,
    *,
    kernel: str = "cubic",
    mask: ArrayLike | None = None,
    repaired: bool = False,
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Resample a frame onto the grid.

    Parameters
    ----------
    image
        The calibrated frame (converted to float32).
    alignment
        From :func:`align`.
    grid
        The target's grid.
    kernel
        ``"cubic"`` (default: no measurable widening of 2.7 px stars, flux kept to
        < 0.01 %; 0.13-0.2 s at 4096 px on 2 busy cores), ``"linear"`` (~6 % wider stars,
        2x faster), ``"lanczos"`` (no sharper than cubic here, 4-7x slower) or
        ``"nearest"``.
    mask
        True where a pixel is bad (saturated, hot, cosmic ray). Bad and non-finite pixels
        are filled from their good neighbours before the kernel sees them (a cubic kernel
        rings next to a hole or a cliff); the weight is what a bilinear warp of the
        good-pixel mask gives (computed around the bad pixels only when they are few).
    repaired
        The masked pixels already hold values repaired from their neighbours
        (:func:`observd.reduce.calibrate` does that): they are not filled again, which
        saves a copy of the frame. Non-finite pixels are still filled.

    Returns
    -------
    image : ndarray of float32
        The frame on the grid, NaN outside its footprint (and where no good pixel
        contributes). The footprint is conservative: cv2 gives NaN wherever the kernel
        reaches past the frame edge, 1-2 px for "linear", 2-5 px for "cubic".
    weight : ndarray of float32
        0..1: the fraction of good frame pixels behind each grid pixel (0 outside).
    """
    if kernel not in _KERNELS:
        raise ValueError(f"kernel must be one of {sorted(_KERNELS)}, not {kernel!r}")
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D, not {img.shape}")
    # one sum (~5 ms at 4096 px) tells whether a pass of isfinite is needed at all
    holes = None if np.isfinite(img.sum(dtype=np.float64)) else ~np.isfinite(img)
    bad = holes
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != img.shape:
            raise ValueError(f"mask shape {m.shape} differs from image shape {img.shape}")
        bad = m if bad is None else bad | m
    flat_bad = np.zeros(0, np.intp) if bad is None else np.flatnonzero(bad)
    if flat_bad.size:
        fill = bad if not repaired else holes
        if fill is not None:
            fy, fx = np.divmod(np.flatnonzero(fill), img.shape[1])  # 15x faster than nonzero
            if fy.size:
                img = _fill_bad(img, fill.copy() if fill is bad else fill, fy, fx)
    ny, nx = grid.shape
    out = np.empty((ny, nx), dtype=np.float32)
    weight = np.zeros((ny, nx), dtype=np.float32)
    box = _footprint_box(alignment.matrix, img.shape, grid.shape)
    if box is None:
        out.fill(np.nan)
        return out, weight
    x0, y0, x1, y1 = box
    _nan_outside(out, box)
    m = alignment.matrix.copy()
    m[0, 2] -= x0
    m[1, 2] -= y0
    roi = out[y0:y1, x0:x1]
    wroi = weight[y0:y1, x0:x1]
    size = (x1 - x0, y1 - y0)
    # only the footprint's bounding box is resampled: the padding costs nothing
    cv2.warpAffine(img, m, size, dst=roi, flags=_KERNELS[kernel],
                   borderMode=cv2.BORDER_CONSTANT, borderValue=float("nan"))
    np.isfinite(roi, out=wroi, casting="unsafe")
    if flat_bad.size > _DENSE_WEIGHT * img.size:
        # many bad pixels: the bilinear warp of the bad-pixel mask, one OpenCV pass
        # (splatting them one by one would cost more than the whole warp)
        lost = cv2.warpAffine(bad.view(np.uint8).astype(np.float32), m, size,
                              flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=0.0)  # fmt: skip
        wroi -= lost
        np.clip(wroi, 0.0, 1.0, out=wroi)
        empty = wroi <= 1e-3
        wroi[empty] = 0.0
        roi[empty] = np.nan
    elif flat_bad.size:
        bad_y, bad_x = np.divmod(flat_bad, img.shape[1])
        py, px, lost = _splat_bad(bad_x, bad_y, m, wroi.shape)
        w = np.clip(wroi[py, px] - lost.astype(np.float32), 0.0, 1.0)
        w[w <= 1e-3] = 0.0
        wroi[py, px] = w
        roi[py[w == 0], px[w == 0]] = np.nan
    det = abs(float(np.linalg.det(alignment.matrix[:, :2])))
    if abs(det - 1.0) > 1e-3:  # other pixel area: keep the flux per star (not for one camera)
        roi *= np.float32(1.0 / det)
    return out, weight


def reproject_to_grid(
    image: ArrayLike, frame_wcs: WCS, grid: Grid, *, order: str = "bicubic"
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Resample a frame whose projection truly differs (another camera, another night).

    ``reproject`` evaluates the WCS pair at every pixel: 20-50x slower than :func:`warp`,
    so only for frames an affine map cannot describe. Needs the grid's WCS (verified, or
    the candidate). Values are scaled by the pixel-area ratio so that a star keeps its flux.

    Returns
    -------
    image : ndarray of float32
        On the grid, NaN outside the footprint.
    weight : ndarray of float32
        The footprint (0..1).
    """
    from astropy.wcs.utils import proj_plane_pixel_area
    from reproject import reproject_interp

    gw = grid.wcs if grid.wcs is not None else grid.wcs_candidate
    if gw is None:
        raise ValueError("the grid has no WCS: reproject needs one; use align() and warp()")
    data = np.asarray(image, dtype=np.float32)
    out, foot = reproject_interp((data, frame_wcs.celestial), gw, shape_out=grid.shape,
                                 order=order)
    out = out.astype(np.float32)
    ratio = proj_plane_pixel_area(gw) / proj_plane_pixel_area(frame_wcs.celestial)
    if abs(ratio - 1.0) > 1e-6:
        out *= np.float32(ratio)
    foot = np.clip(foot, 0.0, 1.0).astype(np.float32)
    out[foot <= 0] = np.nan
    return out, foot


# --------------------------------------------------------------------------------------
# Internals: star lists, fits
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fit:
    matrix: NDArray[np.float64]
    i_frame: NDArray[np.intp]
    j_ref: NDArray[np.intp]
    rms: float
    radius: float  # px: the final match radius


@dataclass(frozen=True)
class _Ref:
    xy: NDArray[np.float64]
    noise: NDArray[np.float64]
    tree: cKDTree
    tri: dict[int, tuple[NDArray[Any], NDArray[Any], cKDTree]]


_REF_CACHE: weakref.WeakKeyDictionary[Grid, _Ref] = weakref.WeakKeyDictionary()


def _ref_cache(grid: Grid) -> _Ref:
    """KD-tree and triangle tables of a grid's stars, built once per grid object."""
    r = _REF_CACHE.get(grid)
    if r is None:
        xy = np.column_stack([grid.ref_x, grid.ref_y]).astype(F64)
        r = _Ref(xy, _noise_terms(grid.ref_flux), cKDTree(xy), {})
        _REF_CACHE[grid] = r
    return r


def _star_arrays(
    stars: StarList,
) -> tuple[NDArray[F64], NDArray[F64], NDArray[F64], NDArray[np.intp]]:
    """Finite x, y, flux sorted brightest first (stable: input order breaks ties), and
    each one's index in ``stars``."""
    x = np.asarray(stars.x, dtype=F64).ravel()
    y = np.asarray(stars.y, dtype=F64).ravel()
    flux = np.asarray(stars.flux, dtype=F64).ravel()
    if not (x.size == y.size == flux.size):
        raise ValueError("star x, y and flux differ in length")
    ok = np.isfinite(x) & np.isfinite(y)
    flux = np.where(np.isfinite(flux), flux, -np.inf)
    index = np.flatnonzero(ok)
    x, y, flux = x[ok], y[ok], flux[ok]
    order = np.argsort(-flux, kind="stable")
    return x[order], y[order], flux[order], index[order]


def _apply(m: NDArray[F64], x: NDArray[F64], y: NDArray[F64]) -> tuple[NDArray[F64], NDArray[F64]]:
    return m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2]


def _apply_xy(m: NDArray[F64], xy: NDArray[F64]) -> NDArray[F64]:
    return xy @ m[:, :2].T + m[:, 2]


def _noise_terms(flux: NDArray[F64]) -> NDArray[F64]:
    """Relative centroid variance of each star, ``(median flux / flux)**2``: a faint star's
    centroid error grows as 1/SNR, and SNR ~ flux where the sky dominates."""
    f = np.where(np.isfinite(flux) & (flux > 0), flux, np.nan)
    med = np.nanmedian(f) if np.any(np.isfinite(f)) else np.nan
    if not np.isfinite(med) or med <= 0:
        return np.ones(flux.shape)
    return np.nan_to_num((med / f) ** 2, nan=1e6, posinf=1e6)


def _weights(fnoise: NDArray[F64], ref: _Ref, i: NDArray[np.intp],
             j: NDArray[np.intp]) -> NDArray[F64]:
    """Inverse variance of a pair's offset: both centroids' noise plus a floor, so that a
    bright (or saturated) star counts at most ~10x a typical one."""
    return 1.0 / (0.25 + np.minimum(fnoise[i], 1e4) + np.minimum(ref.noise[j], 1e4))


def _fit_similarity(src: NDArray[F64], dst: NDArray[F64],
                    w: NDArray[F64] | None = None) -> NDArray[F64]:
    """Weighted least-squares rotation + scale + shift (no reflection), ``src`` -> ``dst``."""
    w = np.ones(src.shape[0]) if w is None else w
    zs = src[:, 0] + 1j * src[:, 1]
    zd = dst[:, 0] + 1j * dst[:, 1]
    ms, md = np.average(zs, weights=w), np.average(zd, weights=w)
    a = np.sum(w * (zd - md) * np.conj(zs - ms)) / np.sum(w * np.abs(zs - ms) ** 2)
    b = md - a * ms
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])


def _fit_affine(src: NDArray[F64], dst: NDArray[F64],
                w: NDArray[F64] | None = None) -> NDArray[F64]:
    """Weighted least-squares affine map ``src`` -> ``dst`` (centred for conditioning)."""
    w = np.ones(src.shape[0]) if w is None else w
    ms = np.average(src, axis=0, weights=w)
    md = np.average(dst, axis=0, weights=w)
    sw = np.sqrt(w)[:, None]
    a, *_ = np.linalg.lstsq((src - ms) * sw, (dst - md) * sw, rcond=None)
    lin = a.T
    return np.column_stack([lin, md - lin @ ms])


def _fit(src: NDArray[F64], dst: NDArray[F64], model: str,
         w: NDArray[F64] | None = None) -> NDArray[F64]:
    if model == "affine" and src.shape[0] >= 12:
        return _fit_affine(src, dst, w)
    return _fit_similarity(src, dst, w)


def _mutual_pairs(p: NDArray[F64], ref: _Ref, radius: float) -> tuple[NDArray[np.intp],
                                                                       NDArray[np.intp]]:
    """One-to-one pairs (frame i, ref j): each frame star's nearest reference star within
    ``radius``, and of the frame stars claiming the same reference star only the closest."""
    d, j = ref.tree.query(p, distance_upper_bound=radius)
    ok = np.isfinite(d)
    i = np.nonzero(ok)[0]
    j = j[ok]
    if i.size == 0:
        return i, j
    # keep, for every reference star, only its nearest frame star
    order = np.lexsort((d[ok], j))
    first = np.ones(order.size, dtype=bool)
    first[1:] = j[order][1:] != j[order][:-1]
    sel = order[first]
    return i[sel], j[sel]


def _refine(m0: NDArray[F64], frame: NDArray[F64], fnoise: NDArray[F64], ref: _Ref,
            model: str, radii: tuple[float, ...] = _REFINE_RADII) -> _Fit | None:
    """Match and fit with shrinking radii, match once more within 3.5 sigma of the
    residuals (so noisy centroids keep their stars), then clip at 3.5 sigma. Fits are
    weighted by the pairs' centroid precision."""
    m = m0
    i = j = np.zeros(0, dtype=np.intp)

    def fit() -> NDArray[F64]:
        return _fit(frame[i], ref.xy[j], model, _weights(fnoise, ref, i, j))

    for r in radii:
        i, j = _mutual_pairs(_apply_xy(m, frame), ref, r)
        if i.size < 3:
            return None
        m = fit()
    res = np.hypot(*(_apply_xy(m, frame[i]) - ref.xy[j]).T)
    sigma = float(np.median(res)) / 1.1774  # the median of a 2-D Gaussian radius
    radius = float(np.clip(3.5 * sigma, *_FINAL_RADIUS))
    for _ in range(4):  # until the pairs no longer change (a start off by a rotation)
        i2, j2 = _mutual_pairs(_apply_xy(m, frame), ref, radius)
        if i2.size < 3:
            return None
        same = i2.size == i.size and np.array_equal(i2, i) and np.array_equal(j2, j)
        i, j = i2, j2
        m = fit()
        if same:
            break
    for _ in range(3):
        res = np.hypot(*(_apply_xy(m, frame[i]) - ref.xy[j]).T)
        sigma = float(np.median(res)) / 1.1774
        keep = res <= max(3.5 * sigma, 0.05)
        if keep.all() or keep.sum() < 3:
            break
        i, j = i[keep], j[keep]
        m = fit()
    res = np.hypot(*(_apply_xy(m, frame[i]) - ref.xy[j]).T)
    return _Fit(m, i, j, float(np.sqrt(np.mean(res ** 2))), radius)


def _chance_matches(fit: _Fit, frame: NDArray[F64], ref: _Ref) -> float:
    """Expected number of frame stars that would land within the match radius of some
    reference star by chance, from the *local* density of reference stars around each
    (a cluster core or a galaxy's knots are dense where the field is not)."""
    p = _apply_xy(fit.matrix, frame)
    counts = np.asarray(ref.tree.query_ball_point(p, _LOCAL_RADIUS, return_length=True),
                        dtype=F64)
    counts[fit.i_frame] -= 1.0  # a true partner is not a chance neighbour
    return float(np.clip(counts, 0.0, None).sum() * (fit.radius / _LOCAL_RADIUS) ** 2)


def _accept(fit: _Fit | None, frame: NDArray[F64], ref: _Ref, min_matches: int) -> bool:
    """At least ``min_matches`` pairs, and too many for chance: the Poisson probability of
    as many chance pairs must be below ``_FALSE_MATCH`` -- tiny, because the search tries
    of the order of 1e8 distinct transforms (random star lists reach 6-9 pairs)."""
    if fit is None or fit.i_frame.size < min_matches:
        return False
    lam = _chance_matches(fit, frame, ref)
    if lam <= 0:
        return True
    return float(poisson.logsf(fit.i_frame.size - 1, lam)) < math.log(_FALSE_MATCH)


# --------------------------------------------------------------------------------------
# Internals: the WCS path
# --------------------------------------------------------------------------------------


def _wcs_affine(frame_wcs: WCS, grid_wcs: WCS,
                shape: tuple[int, int]) -> tuple[NDArray[F64], float] | None:
    """The affine map frame px -> grid px implied by the two headers (fit on a 7x7 lattice)
    and the largest deviation of the headers from it (px): the projection difference."""
    ny, nx = shape
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, 7), np.linspace(0, ny - 1, 7))
    src = np.column_stack([gx.ravel(), gy.ravel()])
    try:
        world = frame_wcs.celestial.all_pix2world(src, 0)
        dst = np.asarray(grid_wcs.all_world2pix(world, 0, quiet=True), dtype=F64)
    except Exception:  # noqa: BLE001 - any failure of a header means: do not use it
        return None
    if not np.all(np.isfinite(dst)):
        return None
    m = _fit_affine(src, dst)
    return m, float(np.max(np.hypot(*(_apply_xy(m, src) - dst).T)))


def _wcs_error(m_wcs: NDArray[F64], fit: _Fit, frame: NDArray[F64]) -> float:
    """Median distance (px) between where the header pair and the star fit put the matched
    stars: the header's own error, free of centroid noise."""
    d = _apply_xy(m_wcs, frame[fit.i_frame]) - _apply_xy(fit.matrix, frame[fit.i_frame])
    return float(np.median(np.hypot(d[:, 0], d[:, 1])))


def _align_wcs(m_wcs: NDArray[F64], frame: NDArray[F64], fnoise: NDArray[F64], ref: _Ref,
               shape: tuple[int, int], min_matches: int,
               model: str) -> tuple[_Fit | None, float | None]:
    """Use the header pair if it predicts the stars: (fit or None, header residual px)."""
    fit = _refine(m_wcs, frame, fnoise, ref, model, radii=(2.0, 1.5))
    if fit is None or not _accept(fit, frame, ref, min_matches):
        return None, None
    residual = _wcs_error(m_wcs, fit, frame)
    ny, nx = shape
    corners = np.array([[0, 0], [nx - 1, 0], [nx - 1, ny - 1], [0, ny - 1]], F64)
    worst = float(np.max(np.hypot(*(_apply_xy(m_wcs, corners)
                                    - _apply_xy(fit.matrix, corners)).T)))
    if residual < WCS_TOLERANCE and worst < WCS_CORNER_TOLERANCE:
        return fit, residual
    return None, None


def _wcs_to_str(w: WCS | None) -> str | None:
    return None if w is None else w.to_header(relax=True).tostring()


def _wcs_from_str(s: str | None, shape: tuple[int, int]) -> WCS | None:
    if not s:
        return None
    w = WCS(fits.Header.fromstring(s))
    w.pixel_shape = (shape[1], shape[0])
    return w


def _shift_wcs(w: WCS, pad_x: float, pad_y: float, shape: tuple[int, int]) -> WCS:
    """The same sky on a grid whose pixel (x + pad_x, y + pad_y) is frame pixel (x, y).
    Through the header, so SIP (defined relative to CRPIX) follows."""
    h = w.celestial.to_header(relax=True)
    h["CRPIX1"] = float(h.get("CRPIX1", 0.0)) + pad_x
    h["CRPIX2"] = float(h.get("CRPIX2", 0.0)) + pad_y
    out = WCS(h)
    out.pixel_shape = (shape[1], shape[0])
    return out


def _carry_wcs(frame_wcs: WCS, m: NDArray[F64], frame_shape: tuple[int, int],
               grid_shape: tuple[int, int]) -> WCS:
    """The frame's WCS expressed on the grid through the affine ``m`` (frame -> grid)."""
    w = frame_wcs.celestial
    lin = m[:, :2]
    if w.sip is None and not (w.cpdis1 or w.cpdis2 or w.det2im1 or w.det2im2):
        h = w.to_header(relax=True)
        for k in ("PC1_1", "PC1_2", "PC2_1", "PC2_2", "CD1_1", "CD1_2", "CD2_1", "CD2_2",
                  "CDELT1", "CDELT2"):
            h.remove(k, ignore_missing=True)
        crpix0 = np.asarray(w.wcs.crpix, dtype=F64) - 1.0
        new_crpix = lin @ crpix0 + m[:, 2] + 1.0
        cd = w.pixel_scale_matrix @ np.linalg.inv(lin)
        h["CRPIX1"], h["CRPIX2"] = float(new_crpix[0]), float(new_crpix[1])
        for a in range(2):
            for b in range(2):
                h[f"CD{a + 1}_{b + 1}"] = float(cd[a, b])
        out = WCS(h)
    else:
        out = _fit_carried(w, m, frame_shape)
    out.pixel_shape = (grid_shape[1], grid_shape[0])
    return out


def _fit_carried(w: WCS, m: NDArray[F64], frame_shape: tuple[int, int]) -> WCS:
    """Distorted headers: refit a TAN-SIP on a lattice of frame points moved onto the grid."""
    from astropy.coordinates import SkyCoord
    from astropy.wcs.utils import fit_wcs_from_points

    ny, nx = frame_shape
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, 12), np.linspace(0, ny - 1, 12))
    src = np.column_stack([gx.ravel(), gy.ravel()])
    ra, dec = w.all_pix2world(src[:, 0], src[:, 1], 0)
    dst = _apply_xy(m, src)
    deg = None
    if w.sip is not None:
        deg = max(int(w.sip.a_order), 2)
    return fit_wcs_from_points((dst[:, 0], dst[:, 1]), SkyCoord(ra, dec, unit="deg"),
                               projection="TAN", sip_degree=deg)


def _wcs_disagreement(a: WCS, b: WCS, grid: Grid) -> tuple[float, float]:
    """(median, max) pixel distance between where ``a`` and ``b`` put the same sky points,
    over a lattice of the reference frame's area on the grid."""
    pad_y, pad_x = grid.pad
    ny, nx = grid.frame_shape
    gx, gy = np.meshgrid(np.linspace(pad_x, pad_x + nx - 1, 7),
                         np.linspace(pad_y, pad_y + ny - 1, 7))
    pts = np.column_stack([gx.ravel(), gy.ravel()])
    try:
        back = b.all_world2pix(a.all_pix2world(pts, 0), 0, quiet=True)
    except Exception:  # noqa: BLE001 - an unusable header disagrees
        return math.inf, math.inf
    d = np.hypot(*(np.asarray(back) - pts).T)
    if not np.all(np.isfinite(d)):
        return math.inf, math.inf
    return float(np.median(d)), float(d.max())


# --------------------------------------------------------------------------------------
# Internals: triangle matching
# --------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _combinations(n: int) -> NDArray[np.intp]:
    if n < 3:
        return np.zeros((0, 3), dtype=np.intp)
    return np.array(list(itertools.combinations(range(n), 3)), dtype=np.intp)


def _triangles(xy: NDArray[F64]) -> tuple[NDArray[np.intp], NDArray[F64]]:
    """All triangles of ``xy``: vertex indices ordered by the length of the opposite side
    (longest first) and the invariants (L1/L0, L2/L0, 10 * orientation)."""
    idx = _combinations(xy.shape[0])
    if idx.size == 0:
        return idx, np.zeros((0, 3))
    z = xy[:, 0] + 1j * xy[:, 1]
    p = z[idx]
    sides = np.abs(np.stack([p[:, 1] - p[:, 2], p[:, 0] - p[:, 2], p[:, 0] - p[:, 1]], axis=1))
    order = np.argsort(-sides, axis=1)
    verts = np.take_along_axis(idx, order, axis=1)
    s = np.take_along_axis(sides, order, axis=1)
    keep = s[:, 2] >= _MIN_SIDE
    verts, s = verts[keep], s[keep]
    q = z[verts]
    cross = ((q[:, 1] - q[:, 0]) * np.conj(q[:, 2] - q[:, 0])).imag
    inv = np.column_stack([s[:, 1] / s[:, 0], s[:, 2] / s[:, 0], 10.0 * np.sign(cross)])
    return verts, inv


def _ref_triangles(ref: _Ref, n: int) -> tuple[NDArray[np.intp], NDArray[F64], cKDTree]:
    if n not in ref.tri:
        verts, inv = _triangles(ref.xy[:n])
        ref.tri[n] = (verts, inv, cKDTree(inv))
    return ref.tri[n]


def _hypotheses(frame: NDArray[F64], ref: _Ref, nf: int, nr: int, eps: float,
                centre: complex, max_scale_error: float) -> list[NDArray[F64]]:
    """Similarity transforms voted for by matched triangles, best-supported first."""
    fverts, finv = _triangles(frame[:nf])
    rverts, _, rtree = _ref_triangles(ref, min(nr, ref.xy.shape[0]))
    if fverts.shape[0] == 0 or rverts.shape[0] == 0:
        return []
    pairs = cKDTree(finv).sparse_distance_matrix(rtree, eps, output_type="ndarray")
    if pairs.size == 0:
        return []
    zf = (frame[:, 0] + 1j * frame[:, 1])[fverts[pairs["i"]]]
    zr = (ref.xy[:, 0] + 1j * ref.xy[:, 1])[rverts[pairs["j"]]]
    mf, mr = zf.mean(axis=1, keepdims=True), zr.mean(axis=1, keepdims=True)
    a = np.sum((zr - mr) * np.conj(zf - mf), axis=1) / np.sum(np.abs(zf - mf) ** 2, axis=1)
    ok = np.abs(np.abs(a) - 1.0) <= max_scale_error
    a = a[ok]
    if a.size == 0:
        return []
    b = mr[ok, 0] - a * mf[ok, 0]
    c = a * centre + b  # where the frame centre lands
    rot = np.degrees(np.angle(a))
    k = eps / 0.01  # looser triangles, wider bins
    bin_rot, bin_shift = _VOTE_ROT * k, _VOTE_SHIFT * k
    best: list[tuple[int, NDArray[np.bool_]]] = []
    for off in (0.0, 0.5):  # two bin origins, so no cluster is split by a bin edge
        kr = np.floor((rot + 180.0) / bin_rot + off).astype(np.int64) % int(360 / bin_rot)
        kx = np.floor(c.real / bin_shift + off).astype(np.int64)
        ky = np.floor(c.imag / bin_shift + off).astype(np.int64)
        key = (kr * 100_003 + kx) * 100_019 + ky
        _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
        inverse = inverse.ravel()
        for top in np.argsort(-counts, kind="stable")[:3]:
            best.append((int(counts[top]), inverse == top))
    best.sort(key=lambda t: -t[0])
    out: list[NDArray[F64]] = []
    for _, sel in best:
        am = complex(np.median(a[sel].real), np.median(a[sel].imag))
        cm = complex(np.median(c[sel].real), np.median(c[sel].imag))
        bm = cm - am * centre
        out.append(np.array([[am.real, -am.imag, bm.real], [am.imag, am.real, bm.imag]]))
    return out


def _align_stars(frame: NDArray[F64], fnoise: NDArray[F64], ref: _Ref, shape: tuple[int, int],
                 min_matches: int, max_scale_error: float,
                 model: str) -> tuple[_Fit | None, int, float]:
    """Triangle matching over a few star subsets, from the cheapest; returns (best accepted
    fit or None, the most pairs any hypothesis reached, and their match radius)."""
    ny, nx = shape
    centre = complex((nx - 1) / 2.0, (ny - 1) / 2.0)
    best: _Fit | None = None
    most, most_radius = 0, _FINAL_RADIUS[0]
    tried: set[tuple[int, int, float]] = set()
    enough = max(min_matches, 0.25 * min(frame.shape[0], ref.xy.shape[0]))
    for nf, nr, eps in _ATTEMPTS:
        key = (min(nf, frame.shape[0]), min(nr, ref.xy.shape[0]), eps)
        if key in tried:
            continue
        tried.add(key)
        k = eps / 0.01
        radii = (max(4.0, _VOTE_SHIFT * k), *_REFINE_RADII)
        for m0 in _hypotheses(frame, ref, key[0], key[1], eps, centre, max_scale_error):
            fit = _refine(m0, frame, fnoise, ref, model, radii)
            if fit is None:
                continue
            n = fit.i_frame.size
            if n > most:
                most, most_radius = n, fit.radius
            if not _accept(fit, frame, ref, min_matches):
                continue
            if best is None or n > best.i_frame.size or (
                    n == best.i_frame.size and fit.rms < best.rms):
                best = fit
        if best is not None and best.i_frame.size >= enough:
            break
    return best, most, most_radius


# --------------------------------------------------------------------------------------
# Internals: geometry of the result
# --------------------------------------------------------------------------------------


def _make_alignment(fit: _Fit, method: str, shape: tuple[int, int], grid: Grid,
                    wcs_residual: float | None, grid_wcs: WCS | None) -> Alignment:
    m = fit.matrix
    a, b, c, d = m[0, 0], m[0, 1], m[1, 0], m[1, 1]
    rot = math.degrees(math.atan2(c - b, a + d))
    scale = math.sqrt(abs(a * d - b * c))
    ny, nx = shape
    cx, cy = _apply(m, np.array((nx - 1) / 2.0), np.array((ny - 1) / 2.0))
    gny, gnx = grid.shape
    fx = fit.i_frame
    return Alignment(
        matrix=m,
        method=method,
        rms=fit.rms,
        n_matches=int(fit.i_frame.size),
        dx=float(cx) - (gnx - 1) / 2.0,
        dy=float(cy) - (gny - 1) / 2.0,
        rotation_deg=rot,
        scale=scale,
        flipped=abs(rot) > 90.0,
        matched_ref=fit.j_ref,
        matched_frame=fx,
        footprint_fraction=_footprint_fraction(m, shape, grid.shape),
        star_coverage=_hull_fraction(grid.ref_x[fit.j_ref], grid.ref_y[fit.j_ref], shape,
                                     scale),
        wcs_residual=wcs_residual,
        grid_wcs=grid_wcs,
    )


def _footprint_fraction(m: NDArray[F64], shape: tuple[int, int],
                        grid_shape: tuple[int, int]) -> float:
    """Fraction of the grid covered by the frame (on a 64 x 64 lattice of the grid)."""
    gny, gnx = grid_shape
    gx, gy = np.meshgrid(np.linspace(0, gnx - 1, 64), np.linspace(0, gny - 1, 64))
    inv = cv2.invertAffineTransform(m)
    x, y = _apply(inv, gx, gy)
    ny, nx = shape
    inside = (x >= -0.5) & (x <= nx - 0.5) & (y >= -0.5) & (y <= ny - 0.5)
    return float(inside.mean())


def _hull_fraction(x: NDArray[F64], y: NDArray[F64], shape: tuple[int, int],
                   scale: float = 1.0) -> float:
    if x.size < 3:
        return 0.0
    try:
        area = ConvexHull(np.column_stack([x, y])).volume
    except QhullError:
        return 0.0
    return float(min(1.0, area / (shape[0] * shape[1] * scale * scale)))


def _footprint_box(m: NDArray[F64], shape: tuple[int, ...],
                   grid_shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1) on the grid of the frame's footprint, or None."""
    ny, nx = shape[0], shape[1]
    corners = _apply_xy(m, np.array([[-0.5, -0.5], [nx - 0.5, -0.5], [nx - 0.5, ny - 0.5],
                                     [-0.5, ny - 0.5]], F64))
    gny, gnx = grid_shape
    x0 = max(0, int(math.floor(corners[:, 0].min())) - 1)
    y0 = max(0, int(math.floor(corners[:, 1].min())) - 1)
    x1 = min(gnx, int(math.ceil(corners[:, 0].max())) + 2)
    y1 = min(gny, int(math.ceil(corners[:, 1].max())) + 2)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def _nan_outside(out: NDArray[np.float32], box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    out[:y0].fill(np.nan)
    out[y1:].fill(np.nan)
    out[y0:y1, :x0].fill(np.nan)
    out[y0:y1, x1:].fill(np.nan)


def _fill_bad(img: NDArray[np.float32], bad: NDArray[np.bool_], ys: NDArray[np.intp],
              xs: NDArray[np.intp]) -> NDArray[np.float32]:
    """A copy with bad pixels replaced by the mean of their good 5x5 neighbours, growing
    inwards for large holes (saturated cores); the frame median as a last resort.
    ``bad`` is used as scratch (cleared where filled)."""
    if ys.size > _DENSE_BAD * img.size:
        return _fill_bad_dense(img, bad)
    out = img.copy()
    todo = bad
    ny, nx = img.shape
    off = np.arange(-2, 3)
    oy = np.repeat(off, 5)[None, :]
    ox = np.tile(off, 5)[None, :]
    for _ in range(64):
        yy = np.clip(ys[:, None] + oy, 0, ny - 1)
        xx = np.clip(xs[:, None] + ox, 0, nx - 1)
        ok = ~todo[yy, xx]
        cnt = ok.sum(axis=1)
        tot = np.where(ok, out[yy, xx], np.float32(0.0)).sum(axis=1, dtype=F64)
        done = cnt > 0
        out[ys[done], xs[done]] = (tot[done] / cnt[done]).astype(np.float32)
        todo[ys[done], xs[done]] = False
        ys, xs = ys[~done], xs[~done]
        if ys.size == 0:
            return out
    sample = out[::8, ::8][~todo[::8, ::8]]
    out[ys, xs] = np.float32(np.median(sample)) if sample.size else np.float32(0.0)
    return out


def _fill_bad_dense(img: NDArray[np.float32], bad: NDArray[np.bool_]) -> NDArray[np.float32]:
    """:func:`_fill_bad` for frames with many bad pixels: normalised box means."""
    out = img.copy()
    good = (~bad).astype(np.float32)
    vals = np.where(bad, np.float32(0.0), img).astype(np.float32)
    todo = bad.copy()
    for k in (5, 15, 45):
        num = cv2.blur(vals, (k, k), borderType=cv2.BORDER_REFLECT)
        den = cv2.blur(good, (k, k), borderType=cv2.BORDER_REFLECT)
        fill = todo & (den > 1e-6)
        out[fill] = num[fill] / den[fill]
        todo &= ~fill
        if not todo.any():
            return out
    rest = img[~bad]
    out[todo] = np.float32(np.median(rest)) if rest.size else np.float32(0.0)
    return out


def _splat_bad(xs: NDArray[np.intp], ys: NDArray[np.intp], m: NDArray[F64],
               shape: tuple[int, ...]) -> tuple[NDArray[np.intp], NDArray[np.intp], NDArray[F64]]:
    """What a bilinear warp of the bad-pixel mask would give, computed only around the bad
    pixels: each one removes its tent weight from the <= 4x4 output pixels it reaches.
    Returns (row, column, lost weight) of the touched output pixels."""
    inv = cv2.invertAffineTransform(m)
    bx, by = xs.astype(F64), ys.astype(F64)
    gx, gy = _apply(m, bx, by)
    cx, cy = np.floor(gx).astype(np.intp), np.floor(gy).astype(np.intp)
    ny, nx = shape[0], shape[1]
    idx, wts = [], []
    for oy in (-1, 0, 1, 2):
        for ox in (-1, 0, 1, 2):
            px, py = cx + ox, cy + oy
            u, v = _apply(inv, px.astype(F64), py.astype(F64))
            w = np.clip(1.0 - np.abs(u - bx), 0.0, None) * np.clip(1.0 - np.abs(v - by), 0.0, None)
            ok = (w > 0) & (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
            idx.append(py[ok] * nx + px[ok])
            wts.append(w[ok])
    flat = np.concatenate(idx)
    uniq, inverse = np.unique(flat, return_inverse=True)
    lost = np.bincount(inverse.ravel(), weights=np.concatenate(wts), minlength=uniq.size)
    return uniq // nx, uniq % nx, lost
