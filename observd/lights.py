"""The light path: calibrate, measure, align, judge, then hand on to the stack.

A recorded light goes, in order, through :mod:`observd.reduce` (with the masters
:class:`observd.calibration.Calibrations` selects), :mod:`observd.quality` (measure),
:mod:`observd.register` (onto its target's grid) and the :class:`observd.quality.Judge`.
Every outcome is one row of the catalog's ``lights`` table (the numbers) and the frame's
status and reason:

- ``waiting``: a master is missing ("waiting for flat R"); retried when one appears,
  and at the end of a run processed with what exists (and flagged);
- ``rejected``: with the rule and its numbers, or "no alignment: ...";
- ``provisional``: the first frame of a filter, accepted into the judge's history but
  held back from the stack until the next frame of that filter confirms it;
- ``accepted``: on its way into the coadd (``stacked`` once it is in).

The first accepted light of a target (any filter) defines the target's grid; a light
of the same target pointed far away (a new field, a pointing jump) starts a new grid,
named ``"<target> #2"``, instead of ruining the first one.

A one-shot-colour camera (``BAYERPAT``) is calibrated in CFA space, then debayered into
full-resolution R, G, B planes; the frame is measured, judged and aligned once, on their
mean (the luminance), and the one transform puts the three planes on the grid
(:attr:`Aligned.channels`): the stack takes them as the target's filters R, G and B, so
the colour picture appears as for a mono camera with three filters. The frame keeps one
``lights`` row and one status, whatever the number of colours.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from loguru import logger

from observd import quality, reduce, register, render
from observd.calibration import Calibrations, Selection
from observd.catalog import Catalog
from observd.config import Config

__all__ = ["Aligned", "LightStage"]


@dataclass
class Aligned:
    """A light calibrated, judged and resampled onto its target's grid."""

    frame: dict[str, Any]
    target_id: int
    image: np.ndarray  # float32 on the grid, ADU (not yet per second), NaN outside
    weight: np.ndarray  # float32 0..1 coverage
    measurement: quality.Measurement
    transparency: float
    alignment: register.Alignment
    # a colour (Bayer) camera: {"R": image, "G": ..., "B": ...} on the grid, each stacked
    # as the target's filter of that name; ``image`` is then their mean (the luminance)
    channels: dict[str, np.ndarray] | None = None


class LightStage:
    """Take lights through calibration, measurement, alignment and judgement.

    Parameters
    ----------
    config, catalog, calibrations
        As for the pipeline.
    stack
        Called with each :class:`Aligned` light that is accepted and confirmed; the
        coadd's entry point.
    """

    def __init__(
        self,
        config: Config,
        catalog: Catalog,
        calibrations: Calibrations,
        stack: Callable[[Aligned], None],
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.calibrations = calibrations
        self.stack = stack
        self._judges: dict[str, quality.Judge] = {}  # per night
        self._grids: dict[int, register.Grid] = {}  # per target id
        self._held: dict[int, Aligned] = {}  # provisional frames, by frame id
        self._waiting_for_reference: set[int] = set()  # held until their reference is judged
        self._prepared: dict[tuple, reduce.Masters] = {}  # the last masters combination

    # ----------------------------------------------------------------- entry

    def process(self, frame: dict[str, Any], data: np.ndarray, header: fits.Header) -> None:
        """One recorded light; its status and numbers end up in the catalog."""
        selection = self.calibrations.select(frame)
        if not selection.ready:
            reason = "waiting for " + ", ".join(selection.waiting)
            self._set_status(frame, "waiting", reason)
            return
        self._run(frame, data, header, selection)

    def retry_waiting(self, *, final: bool = False) -> None:
        """Lights waiting for a master: process those whose masters now exist.

        With ``final`` (end of a run or a night) every waiting light is processed with
        what exists, and says what it lacked.
        """
        from observd.rawio import BadFrame, read_raw

        for frame in self.catalog.frames("type = 'light' and status = 'waiting'"):
            selection = self.calibrations.select(frame)
            if not selection.ready and not final:
                continue
            try:
                raw = read_raw(frame["path"])
                self._run(frame, raw.data, raw.header, selection)
            except (BadFrame, OSError) as exc:
                self._set_status(frame, "failed", f"cannot be read again: {exc}")
            except Exception as exc:  # one bad frame must not stop the night
                logger.exception("{}: light processing failed", frame["path"])
                self._set_status(frame, "failed", f"light failed: {type(exc).__name__}: {exc}")

    def finish(self) -> None:
        """End of a run: waiting lights processed, provisional frames confirmed."""
        self.retry_waiting(final=True)
        self._waiting_for_reference.clear()
        for frame_id in sorted(self._held, key=lambda i: self._held[i].frame["date_obs"]):
            aligned = self._held.pop(frame_id)
            self._confirm(aligned, "accepted alone: no other frame of its filter to compare")

    def grid(self, target_id: int) -> register.Grid:
        if target_id not in self._grids:
            self._grids[target_id] = register.Grid.from_dict(self.catalog.target(target_id)["grid"])
        return self._grids[target_id]

    def hold(self, aligned: Aligned) -> None:
        """Hold a provisional frame back from the stack again (after a restart); it is
        stacked at the end of the run unless a review rejects it first."""
        self._held[aligned.frame["id"]] = aligned

    def reconstruct(self, frame: dict[str, Any], *, reselect: bool = False) -> Aligned:
        """A light already judged, made again from its raw frame with the transform the
        catalog recorded (no judging twice).

        Without ``reselect``, with the masters it was calibrated with (after a crash, to
        re-add the frames a coadd's last checkpoint does not hold); with it, with the
        masters that are best now (a restack after dawn flats or more darks arrived),
        and the catalog says which.
        """
        from observd.rawio import read_raw

        (light,) = self.catalog.lights("l.frame_id = ?", [frame["id"]])
        if reselect:
            sel = self.calibrations.select(frame)
            self.catalog.upsert_light(
                {
                    "frame_id": frame["id"],
                    **{f"{step}_id": m_id for step, m_id in sel.ids().items()},
                    "calibration": {**(light["calibration"] or {}), "notes": sel.notes,
                                    "skipped": sel.skipped, "missing": sel.waiting},
                }
            )  # fmt: skip
        else:
            sel = Selection(
                bias=self.catalog.master(light["bias_id"]) if light["bias_id"] else None,
                dark=self.catalog.master(light["dark_id"]) if light["dark_id"] else None,
                flat=self.catalog.master(light["flat_id"]) if light["flat_id"] else None,
            )
        raw = read_raw(frame["path"])
        cal = self._calibrate(frame, raw.data, sel, count_use=reselect)
        grid = self.grid(light["target_id"])
        alignment = replace(register.reference_alignment(grid), matrix=np.array(light["matrix"]))
        if frame.get("bayer"):
            planes = _colour_planes(cal.image, cal.mask, frame["bayer"])
            image = _planes_luminance(planes)
            warped, weight, channels = _warp_colour(planes, alignment, grid, cal.mask)
        else:
            image, channels = cal.image, None
            warped, weight = register.warp(image, alignment, grid, mask=cal.mask, repaired=True)
        m = quality.measure(image, mask=cal.mask)
        return Aligned(frame, light["target_id"], warped, weight, m,
                       light["transparency"] or 1.0, alignment, channels)  # fmt: skip

    # ----------------------------------------------------------------- stages

    def _run(self, frame: dict, data: np.ndarray, header: fits.Header, sel: Selection) -> None:
        cal = self._calibrate(frame, data, sel)
        wcs = _frame_wcs(header) if frame.get("has_wcs") else None
        planes = None
        if frame.get("bayer"):  # colour: judged and aligned once, on the luminance
            planes = _colour_planes(cal.image, cal.mask, frame["bayer"])
            image = _planes_luminance(planes)
        else:
            image = cal.image
        m = quality.measure(image, mask=cal.mask, pixel_scale=_pixel_scale(frame, wcs))
        key = (frame["target"], frame["filter"] or "")
        judge = self._judge(frame["night"])
        row: dict[str, Any] = {
            "frame_id": frame["id"],
            "night": frame["night"],
            "target": frame["target"],
            "filter": frame["filter"],
            **{f"{step}_id": m_id for step, m_id in sel.ids().items()},
            "calibration": {
                "notes": sel.notes,
                "skipped": sel.skipped,
                "missing": sel.waiting,
                "pixels": cal.counts,
            },
            **_metrics(m, frame["exptime"]),
        }
        target, alignment = self._align(frame, m, wcs, judge, key)
        if isinstance(alignment, str):  # no alignment: the reason
            self._reject(frame, row | {"target_id": target}, alignment, {})
            return
        transparency = self._transparency(target, frame, m, alignment)
        verdict = judge.judge(key, m, transparency=transparency)
        row |= {
            "target_id": target,
            "transparency": transparency,
            "align_method": alignment.method,
            "align_rms": alignment.rms,
            "n_matches": alignment.n_matches,
            "dx": alignment.dx,
            "dy": alignment.dy,
            "rotation": alignment.rotation_deg,
            "flipped": int(alignment.flipped),
            "matrix": alignment.matrix.tolist(),
        }
        if not verdict.accepted:
            self._reject(frame, row, verdict.reason, verdict.numbers)
            return
        self._accept_into_grid(target, alignment, frame, m)
        channels = None
        if planes is not None:  # one transform for the three colours
            image, weight, channels = _warp_colour(planes, alignment, self._grids[target],
                                                   cal.mask)  # fmt: skip
            del planes
        else:
            # calibrate repaired the masked pixels: warp need not fill them again
            image, weight = register.warp(image, alignment, self._grids[target],
                                          mask=cal.mask, repaired=True)
        aligned = Aligned(frame, target, image, weight, m, transparency, alignment, channels)
        judge.accept(
            key,
            quality.frame_metrics(m, exptime=frame["exptime"], transparency=transparency),
            transparency,
            frame=frame["id"],
        )
        missing = sel.waiting
        note = f"calibrated without {', '.join(missing)}" if missing else None
        self.catalog.upsert_light(row | {"verdict": "accepted", "reason": note,
                                         "numbers": verdict.numbers})  # fmt: skip
        if verdict.provisional or self._reference_held(target, frame["filter"] or ""):
            # a frame measured against a flux reference that is itself still on probation
            # waits with it: if the reference turns out cloudy, its scale is corrected
            # before it reaches the stack
            if not verdict.provisional:
                self._waiting_for_reference.add(frame["id"])
            self._held[frame["id"]] = aligned
            self._set_status(frame, "provisional", note)
        else:
            self._set_status(frame, "accepted", note)
            self.stack(aligned)
        for frame_id, revised in judge.review(key):
            self._review(frame_id, revised)

    def _calibrate(
        self, frame: dict, data: np.ndarray, sel: Selection, *, count_use: bool = True
    ) -> reduce.Calibrated:
        ids = (*(m["id"] if m else None for m in (sel.bias, sel.dark, sel.flat)), frame["exptime"])
        if ids not in self._prepared:  # every light of a filter shares its masters
            load = self.calibrations.load
            dark = None
            if sel.dark is not None:
                dark = self.calibrations.dark_image(sel.dark, frame["exptime"])
            self._prepared = {
                ids: reduce.prepare(
                    load(sel.bias) if sel.bias else None,
                    dark,
                    load(sel.flat) if sel.flat else None,
                )
            }
        for master in (sel.bias, sel.dark, sel.flat):
            if master is not None and count_use:
                self.catalog.mark_master_used(master["id"])
        return reduce.calibrate(
            data,
            self._prepared[ids],
            hot=self.calibrations.hot_pixels(frame["night"], frame["setup"]),
            saturation=self.config.calibration.saturation,
        )

    # ----------------------------------------------------------------- targets

    def _targets(self, night: str, slug: str) -> list[dict[str, Any]]:
        rows = self.catalog.targets(night, slug)
        for row in rows:
            if row["id"] not in self._grids:
                self._grids[row["id"]] = register.Grid.from_dict(row["grid"])
        return rows

    def _align(self, frame, m, wcs, judge, key) -> tuple[int | None, Any]:
        """The frame's target grid and its alignment, or the reason there is none.

        A target without a grid gets one from its first light that passes the judge;
        that light is then its own reference.
        """
        targets = self._targets(frame["night"], frame["target_slug"])
        if not targets:
            verdict = judge.judge(key, m, transparency=None)
            if not verdict.accepted:
                return None, verdict.reason
            return self._new_grid(frame, m, wcs, number=1)
        reasons = []
        for target in reversed(targets):  # the newest grid first: where the telescope is
            try:
                alignment = register.align(
                    m.stars, self._grids[target["id"]],
                    frame_shape=(frame["ny"], frame["nx"]), wcs=wcs,
                )  # fmt: skip
                return target["id"], alignment
            except register.NoAlignment as exc:
                reasons.append(exc.reason)
        if self._pointing_jump(frame, targets[-1]) and judge.judge(key, m).accepted:
            logger.warning("{}: pointing jump: a new grid for {}", frame["path"], frame["target"])
            return self._new_grid(frame, m, wcs, number=len(targets) + 1)
        return targets[-1]["id"], reasons[0]

    def _pointing_jump(self, frame: dict, target: dict) -> bool:
        """The telescope points more than a quarter field away from the grid's reference."""
        if frame.get("pointing_ra") is None or target.get("pointing_ra") is None:
            return False
        ra0, dec0 = math.radians(target["pointing_ra"]), math.radians(target["pointing_dec"])
        ra1, dec1 = math.radians(frame["pointing_ra"]), math.radians(frame["pointing_dec"])
        cos_d = math.sin(dec0) * math.sin(dec1) + math.cos(dec0) * math.cos(dec1) * math.cos(
            ra1 - ra0
        )
        separation = math.degrees(math.acos(min(1.0, max(-1.0, cos_d)))) * 3600
        scale = frame.get("pixel_scale") or 1.0
        return separation > 0.25 * min(frame["nx"], frame["ny"]) * scale

    def _new_grid(
        self, frame: dict, m: quality.Measurement, wcs: WCS | None, number: int
    ) -> tuple[int, register.Alignment]:
        """A new target grid defined by this frame, which is its own reference."""
        grid = register.make_grid((frame["ny"], frame["nx"]), m.stars, wcs=wcs)
        name = frame["target"] if number == 1 else f"{frame['target']} #{number}"
        target_id = self.catalog.insert_target(
            {
                "night": frame["night"],
                "target": frame["target"],
                "target_slug": frame["target_slug"],
                "grid_no": number,
                "name": name,
                "grid": grid.to_dict(),
                "pointing_ra": frame.get("pointing_ra"),
                "pointing_dec": frame.get("pointing_dec"),
                "reference_frame": frame["id"],
                "filter_refs": {},
            }
        )
        self._grids[target_id] = grid
        self.catalog.log_event(
            "register", "new grid", f"{name}: defined by this frame", frame_id=frame["id"],
            details={"target_id": target_id, "shape": list(grid.shape)},
        )  # fmt: skip
        return target_id, register.reference_alignment(grid)

    def _accept_into_grid(self, target_id: int, alignment, frame: dict, m) -> None:
        """An accepted frame may confirm the grid's WCS, and may become a filter's
        photometric reference."""
        grid = self._grids[target_id]
        updated = register.update_grid_wcs(grid, alignment)
        changes: dict[str, Any] = {}
        if updated is not grid:
            self._grids[target_id] = updated
            changes["grid"] = updated.to_dict()
        refs = self.catalog.target(target_id)["filter_refs"] or {}
        filt = frame["filter"] or ""
        if filt not in refs:
            flux = np.full(len(grid.ref_x), np.nan)
            ok = ~m.stars.saturated[alignment.matched_frame]
            per_second = m.stars.flux[alignment.matched_frame] / frame["exptime"]
            flux[alignment.matched_ref[ok]] = per_second[ok]
            refs[filt] = {"frame_id": frame["id"], "flux": [_json_float(v) for v in flux]}
            changes["filter_refs"] = refs
        if changes:
            self.catalog.update_target(target_id, changes)

    def _transparency(self, target_id: int, frame: dict, m, alignment) -> float:
        """Flux of the matched stars against the filter's reference frame (1.0 for the
        reference itself, or while there is none)."""
        if alignment.method == "reference":
            return 1.0
        ref = self._filter_ref(target_id, frame["filter"] or "")
        if ref is None:
            return 1.0
        ref_flux = np.array([np.nan if v is None else v for v in ref["flux"]])
        ok = ~m.stars.saturated[alignment.matched_frame]
        idx_ref, idx_frame = alignment.matched_ref[ok], alignment.matched_frame[ok]
        value = quality.transparency(ref_flux[idx_ref], m.stars.flux[idx_frame] / frame["exptime"])
        value /= ref.get("scale", 1.0)  # the reference was replaced (see _replace_reference)
        return float(value) if math.isfinite(value) else 1.0

    # ----------------------------------------------------------------- verdicts

    def _judge(self, night: str) -> quality.Judge:
        """The night's judge; after a restart rebuilt from the accepted lights."""
        if night not in self._judges:
            judge = quality.Judge()
            for row in self.catalog.lights("l.night = ? and l.verdict = 'accepted'", [night]):
                judge.accept(
                    (row["target"], row["filter"] or ""),
                    {k: row[k] for k in ("n_stars", "fwhm", "fwhm_arcsec", "elongation")},
                    row["transparency"],
                    frame=row["frame_id"],
                )
            self._judges[night] = judge
        return self._judges[night]

    def _review(self, frame_id: int, verdict: quality.Verdict) -> None:
        """A provisional frame judged again once its filter has company."""
        aligned = self._held.pop(frame_id, None)
        if aligned is None:
            return
        target_id, filt = aligned.target_id, aligned.frame["filter"] or ""
        ref = self._filter_ref(target_id, filt)
        is_reference = ref is not None and ref["frame_id"] == frame_id
        if verdict.accepted:
            self._confirm(aligned, None)
        else:
            row = {"frame_id": frame_id, "verdict": "rejected", "reason": verdict.reason,
                   "numbers": verdict.numbers}  # fmt: skip
            self.catalog.upsert_light(row)
            self._set_status(aligned.frame, "rejected", verdict.reason)
        if not is_reference:
            return
        waiting = sorted(
            (i for i in self._waiting_for_reference
             if self._held[i].target_id == target_id and (self._held[i].frame["filter"] or "")
             == filt),
            key=lambda i: self._held[i].frame["date_obs"],
        )  # fmt: skip
        if not verdict.accepted:
            self._replace_reference(target_id, aligned.frame, [self._held[i] for i in waiting])
        for i in waiting:
            self._waiting_for_reference.discard(i)
            self._confirm(self._held.pop(i), None)

    def _replace_reference(self, target_id: int, bad: dict, waiting: list[Aligned]) -> None:
        """A filter's flux reference was rejected (a cloudy first frame): put the filter on
        the scale of the frames accepted since, so its stack is not several times too faint.

        Their transparencies, measured against the bad reference, say by how much: their
        median becomes 1, for them, for the judge and for every later frame.
        """
        values = [a.transparency for a in waiting if math.isfinite(a.transparency) and
                  a.transparency > 0]  # fmt: skip
        if not values:
            return
        factor = float(np.median(values))
        target = self.catalog.target(target_id)
        refs = target["filter_refs"] or {}
        filt = bad["filter"] or ""
        refs[filt] = {**refs[filt], "scale": refs[filt].get("scale", 1.0) * factor,
                      "rejected_reference": bad["id"]}  # fmt: skip
        self.catalog.update_target(target_id, {"filter_refs": refs})
        self._judge(bad["night"]).rescale_transparency((bad["target"], filt), factor)
        for a in waiting:
            a.transparency /= factor
            self.catalog.upsert_light({"frame_id": a.frame["id"], "transparency": a.transparency})
        logger.info(
            "{} {}: flux reference {} rejected; the filter's frames are rescaled by 1/{:.3g}",
            target["name"], filt, bad["path"].rsplit("/", 1)[-1], factor,
        )  # fmt: skip

    def _reference_held(self, target_id: int, filt: str) -> bool:
        """True while the filter's flux reference is a provisional frame."""
        ref = self._filter_ref(target_id, filt)
        return ref is not None and ref["frame_id"] in self._held

    def _filter_ref(self, target_id: int, filt: str) -> dict[str, Any] | None:
        """The filter's photometric reference on this target grid (frame, star fluxes,
        scale), or None before its first accepted frame."""
        return (self.catalog.target(target_id)["filter_refs"] or {}).get(filt)

    def _confirm(self, aligned: Aligned, note: str | None) -> None:
        self._set_status(aligned.frame, "accepted", note)
        self.stack(aligned)

    def _reject(self, frame: dict, row: dict, reason: str, numbers: dict) -> None:
        self.catalog.upsert_light(row | {"verdict": "rejected", "reason": reason,
                                         "numbers": numbers})  # fmt: skip
        self._set_status(frame, "rejected", reason)

    def _set_status(self, frame: dict, status: str, reason: str | None) -> None:
        with self.catalog.transaction():
            self.catalog.update_frame(frame["id"], {"status": status, "reason": reason})
            self.catalog.log_event("light", status, reason, frame_id=frame["id"])
        if status in ("rejected", "failed"):
            logger.warning("{}: {}: {}", frame["path"].rsplit("/", 1)[-1], status, reason)
        else:
            logger.info("{}: {}{}", frame["path"].rsplit("/", 1)[-1], status,
                        f" ({reason})" if reason else "")  # fmt: skip


def _colour_planes(cfa: np.ndarray, mask: np.ndarray, bayer: str) -> dict[str, np.ndarray]:
    """A calibrated colour (Bayer) frame as three full-resolution planes R, G, B.

    Under a colour mosaic neighbouring pixels see different colours: measured as they
    are, stars look square and elongated, and a warp mixes the colours. Bilinear
    debayering keeps full resolution (superpixels would leave stars of a small
    telescope undersampled, their shapes unmeasurable). Masked pixels (saturated,
    hot, cosmic rays) were repaired from neighbours of *any* colour by
    :func:`observd.reduce.calibrate`; here they are left out of the demosaic, which
    fills them from neighbours of their own colour, so a cosmic ray's repair does not
    tint the pixels around it. Where a colour has no good pixel within 2 px (inside a
    large saturated blob) the repaired value stays.
    """
    holed = np.where(mask, np.float32(np.nan), cfa) if mask.any() else cfa
    planes = dict(zip("RGB", render.debayer(holed, bayer), strict=True))
    if holed is not cfa:
        for plane in planes.values():
            np.copyto(plane, cfa, where=np.isnan(plane))
    return planes


def _planes_luminance(planes: dict[str, np.ndarray]) -> np.ndarray:
    """The mean of the three colours: what a colour frame is measured, judged and
    aligned on (and the coadd a mono view of it would be)."""
    return (planes["R"] + planes["G"] + planes["B"]) / np.float32(3.0)


def _warp_colour(
    planes: dict[str, np.ndarray],
    alignment: register.Alignment,
    grid: register.Grid,
    mask: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The three colours onto the grid with one transform; their mean (the warp is
    linear: the luminance warped) and the coverage, which the colours share."""
    channels: dict[str, np.ndarray] = {}
    weight = None
    for name, plane in planes.items():
        channels[name], w = register.warp(plane, alignment, grid, mask=mask)
        weight = w if weight is None else weight
    assert weight is not None
    return _planes_luminance(channels), weight, channels


def _metrics(m: quality.Measurement, exptime: float) -> dict[str, Any]:
    return {
        "background": _json_float(m.background / exptime) if exptime else None,
        "background_rms": _json_float(m.background_rms),
        "n_stars": m.n_stars,
        "fwhm": _json_float(m.fwhm),
        "fwhm_arcsec": _json_float(m.fwhm_arcsec),
        "elongation": _json_float(m.elongation),
    }


def _json_float(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _pixel_scale(frame: dict, wcs: WCS | None) -> float | None:
    """arcsec/px: from the frame's WCS, else from its header (pixel size, focal length)."""
    if wcs is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scales = wcs.proj_plane_pixel_scales()
        return float(np.mean([s.to_value("arcsec") for s in scales]))
    return frame.get("pixel_scale")


def _frame_wcs(header: fits.Header) -> WCS | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            wcs = WCS(header, naxis=2)
        except Exception:  # a malformed WCS is no WCS
            return None
    return wcs if wcs.has_celestial else None
