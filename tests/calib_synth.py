"""A small synthetic camera with a known truth, for the combine and camera tests.

Gaussian read noise on a structured bias, Poisson dark electrons from a lognormal
rate map with hot pixels, cosmic rays, and flats with vignetting, dust rings, 1 %
PRNU, Poisson noise and a few faint stars at random positions in every flat.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Camera:
    rng: np.random.Generator
    shape: tuple[int, int]
    gain: float  # e-/ADU
    read_noise_e: float
    bias: np.ndarray  # true bias pattern, ADU
    rate_e: np.ndarray  # true dark current, e-/s
    hot: np.ndarray  # true hot pixels
    flat: np.ndarray  # true flat (vignetting x dust x PRNU), centre ~ 1
    cr_per_mpix_s: float = 5.0  # cosmic-ray events per megapixel and second (sim: 0.3)
    cr_readout: float = 20.0  # events per megapixel in any frame (biases get some too)

    @property
    def read_noise_adu(self) -> float:
        return self.read_noise_e / self.gain

    def cosmic_rays(self, image: np.ndarray, exptime: float) -> np.ndarray:
        """Add cosmic rays (ADU) in place: 1-4 pixel tracks, 100-5000 e- per pixel."""
        ny, nx = self.shape
        lam = (self.cr_readout + self.cr_per_mpix_s * exptime) * ny * nx / 1e6
        for _ in range(self.rng.poisson(lam)):
            y, x = self.rng.integers(0, ny), self.rng.integers(0, nx)
            dy, dx = self.rng.integers(-1, 2, size=2)
            for k in range(self.rng.integers(1, 5)):
                yy, xx = y + k * dy, x + k * dx
                if 0 <= yy < ny and 0 <= xx < nx:
                    image[yy, xx] += self.rng.uniform(100, 5000) / self.gain
        return image

    def read(self, electrons: np.ndarray) -> np.ndarray:
        noise = self.rng.normal(0.0, self.read_noise_e, self.shape)
        return (self.bias + (electrons + noise) / self.gain).astype(np.float32)

    def bias_frame(self, cosmics: bool = True) -> np.ndarray:
        f = self.read(np.zeros(self.shape))
        return self.cosmic_rays(f, 0.0) if cosmics else f

    def dark_frame(self, exptime: float, cosmics: bool = True) -> np.ndarray:
        f = self.read(self.rng.poisson(self.rate_e * exptime).astype(float))
        return self.cosmic_rays(f, exptime) if cosmics else f

    def flat_frame(
        self, level_adu: float, exptime: float = 2.0, stars: int = 12, star_peak=(0.01, 0.1)
    ) -> tuple[np.ndarray, np.ndarray]:
        """A twilight flat: (frame, its star image in ADU)."""
        ny, nx = self.shape
        sky = level_adu * self.gain * self.flat
        star_img = np.zeros(self.shape)
        yy, xx = np.mgrid[0:ny, 0:nx]
        for _ in range(stars):
            y0, x0 = self.rng.uniform(0, ny), self.rng.uniform(0, nx)
            peak = self.rng.uniform(*star_peak) * level_adu * self.gain
            box = (slice(max(0, int(y0) - 8), int(y0) + 9), slice(max(0, int(x0) - 8), int(x0) + 9))
            r2 = (yy[box] - y0) ** 2 + (xx[box] - x0) ** 2
            star_img[box] += peak * np.exp(-r2 / (2 * 1.5**2))
        e = self.rng.poisson(sky + star_img + self.rate_e * exptime).astype(float)
        f = self.read(e)
        return self.cosmic_rays(f, exptime), (star_img / self.gain).astype(np.float32)


def make_camera(
    seed: int = 1,
    shape: tuple[int, int] = (256, 256),
    *,
    gain: float = 1.5,
    read_noise_e: float = 8.0,
    bias_level: float = 1000.0,
    dark_median_e: float = 0.5,
    dark_sigma_log: float = 0.3,
    hot_fraction: float = 0.003,
    warm_columns: int = 2,
    prnu: float = 0.01,
) -> Camera:
    rng = np.random.default_rng(seed)
    ny, nx = shape
    # bias: level, column and row structure, a gentle gradient and pixel fixed pattern
    col = rng.normal(0, 2.0, nx)[None, :]
    row = rng.normal(0, 0.7, ny)[:, None]
    grad = np.linspace(-3, 3, nx)[None, :]
    bias = bias_level + col + row + grad + rng.normal(0, 1.0, shape)
    # dark current: lognormal; warm columns 4-10x the median over part of the column
    # (not hot); hot pixels 50-2000x the median (log-uniform), as in observd.simulate
    rate = dark_median_e * np.exp(rng.normal(0, dark_sigma_log, shape))
    for _ in range(warm_columns):
        x, y0 = rng.integers(0, nx), rng.integers(0, ny // 2)
        rate[y0:, x] *= rng.uniform(4, 10)
    hot = rng.random(shape) < hot_fraction
    rate[hot] = dark_median_e * np.exp(rng.uniform(np.log(50), np.log(2000), hot.sum()))
    # flat: vignetting (25 % down in the corners), dust rings, PRNU
    yy, xx = np.mgrid[0:ny, 0:nx]
    r = np.hypot((yy - ny / 2) / (ny / 2), (xx - nx / 2) / (nx / 2)) / np.sqrt(2)
    flat = 1.0 - 0.25 * r**2
    for _ in range(4):
        cy, cx = rng.uniform(0.15, 0.85) * ny, rng.uniform(0.15, 0.85) * nx
        rad, width = rng.uniform(8, 20), rng.uniform(2, 4)
        depth = rng.uniform(0.03, 0.08)
        d = np.hypot(yy - cy, xx - cx)
        flat *= 1 - depth * np.exp(-((d - rad) ** 2) / (2 * width**2))
    flat *= 1 + rng.normal(0, prnu, shape)
    return Camera(rng, shape, gain, read_noise_e, bias, rate, hot, flat)


def changed_flat(flat: np.ndarray, change: float, rng: np.random.Generator) -> np.ndarray:
    """The flat of a later night, changed as observd.simulate does: a new dust donut of
    depth ``change`` and vignetting deeper by ``change / 2`` in the corners."""
    ny, nx = flat.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    r2 = ((yy - ny / 2) ** 2 + (xx - nx / 2) ** 2) / (2 * (0.5 * ny) ** 2)
    out = flat * (1 - 0.5 * change * r2)
    cy, cx = rng.uniform(0.25, 0.75) * ny, rng.uniform(0.25, 0.75) * nx
    r_out = max(12.0, 0.025 * ny)  # the simulator: 25 px at 1024 px
    d = np.hypot(yy - cy, xx - cx)
    ring = (d > 0.55 * r_out) & (d < r_out)
    out = out * np.where(ring, 1 - change, np.where(d <= 0.55 * r_out, 1 - 0.35 * change, 1))
    return out
