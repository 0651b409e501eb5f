"""An alignment's star pairs index the caller's star list (the transparency and the
filter's flux reference are computed from them), even when register sorts its own copy
by flux and a saturated star has no flux (NaN)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from observd import register


@dataclass
class Stars:
    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray


def _field(n: int = 80, seed: int = 3) -> Stars:
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(20, 480, n), rng.uniform(20, 480, n)
    flux = np.sort(rng.lognormal(8, 1, n))[::-1]  # brightest first, like quality's list
    flux[[0, 4, 9]] = np.nan  # saturated: no aperture flux, ranked by their isophotes
    return Stars(x, y, flux)


def test_reference_alignment_pairs_each_grid_star_with_itself():
    stars = _field()
    grid = register.make_grid((500, 500), stars)
    a = register.reference_alignment(grid)
    pad_y, pad_x = grid.pad
    np.testing.assert_allclose(stars.x[a.matched_frame] + pad_x, grid.ref_x[a.matched_ref])
    np.testing.assert_allclose(stars.y[a.matched_frame] + pad_y, grid.ref_y[a.matched_ref])


def test_align_pairs_index_the_frames_own_star_list():
    ref = _field()
    grid = register.make_grid((500, 500), ref)
    dx, dy = 7.3, -4.1
    rng = np.random.default_rng(5)
    order = rng.permutation(ref.x.size)  # the frame lists its stars in another order
    frame = Stars(ref.x[order] - dx, ref.y[order] - dy, ref.flux[order])
    a = register.align(frame, grid, frame_shape=(500, 500))
    assert a.n_matches >= 60
    pad_y, pad_x = grid.pad
    gx = frame.x[a.matched_frame] + dx + pad_x
    gy = frame.y[a.matched_frame] + dy + pad_y
    assert np.max(np.hypot(gx - grid.ref_x[a.matched_ref], gy - grid.ref_y[a.matched_ref])) < 0.01
