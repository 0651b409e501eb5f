"""Master calibrations that refresh as calibration frames arrive, and choosing them.

The makers (:class:`Calibrations`.add) keep one master per kind, night and setup (dark
and dark flat also per exposure time, flat per filter). A bias or dark frame refreshes
its master at the cost of one frame (:class:`observd.combine.RunningMaster`); a flat
recombines its filter's flats (flats are few and need a robust combine). Each refresh
is a new *version*: a row in the catalog's ``masters`` table (inputs, statistics,
masters it depends on) and a file under ``masters/<night>/versions/``, hard-linked to
the contract name ``masters/<night>/<kind>...fits`` that always holds the current one.
Superseded versions no light used are deleted; the ones lights used are kept, so every
calibrated light can name the exact master it was divided by.

The applier side (:meth:`Calibrations.select`) picks, for a light, the masters of the
same setup from the same night, else the nearest night within an age limit, or says
what the light is waiting for.

After a restart the running masters are rebuilt from the raw frames the catalog says
they hold (in the order they were added), so a crash loses nothing and counts nothing
twice.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from loguru import logger

from observd import __version__, camera
from observd.catalog import Catalog
from observd.combine import DarkRate, RunningMaster, combine_flats, fit_dark_rate, hot_pixel_map
from observd.config import CalibrationConfig
from observd.products import Products, atomic_write_fits
from observd.rawio import BadFrame, read_raw

__all__ = ["CalDecision", "Calibrations", "Selection", "master_key"]

_IMAGETYP = {
    "bias": "MASTER BIAS",
    "dark": "MASTER DARK",
    "darkflat": "MASTER DARKFLAT",
    "flat": "MASTER FLAT",
    "darkrate": "MASTER DARK RATE",
}


def master_key(
    kind: str, night: str, setup: str, *, exptime: float | None = None, filter: str | None = None
) -> str:
    """The identity of one master across its versions: ``dark|2026-03-14|<setup>|60``."""
    extra = ""
    if kind in ("dark", "darkflat"):
        extra = f"|{exptime:g}"
    elif kind == "flat":
        extra = f"|{filter or ''}"
    return f"{kind}|{night}|{setup}{extra}"


@dataclass
class CalDecision:
    """What became of one calibration frame."""

    status: str  # "used", "flagged" or "rejected"
    reason: str | None
    master_key: str | None
    published: list[int] = field(default_factory=list)  # master ids written
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Selection:
    """The masters for one light, or what it is waiting for."""

    bias: dict[str, Any] | None = None
    dark: dict[str, Any] | None = None  # an exact-exposure dark or a dark-rate map
    flat: dict[str, Any] | None = None
    waiting: list[str] = field(default_factory=list)  # "bias", "dark", "flat R"
    skipped: list[str] = field(default_factory=list)  # steps done upstream (CALSTAT)
    notes: list[str] = field(default_factory=list)  # e.g. "flat from 2026-03-12"

    @property
    def ready(self) -> bool:
        return not self.waiting

    def ids(self) -> dict[str, int | None]:
        return {k: (m["id"] if m else None) for k, m in self._by_step().items()}

    def _by_step(self) -> dict[str, dict[str, Any] | None]:
        return {"bias": self.bias, "dark": self.dark, "flat": self.flat}


@dataclass
class _Running:
    """A bias or dark (one exposure time) being built."""

    master: RunningMaster
    frame_ids: list[int] = field(default_factory=list)
    previous_raw: np.ndarray | None = None  # for read noise from bias pairs
    read_noise: list[float] = field(default_factory=list)


class Calibrations:
    """Build, version and select master calibrations.

    Parameters
    ----------
    config
        The ``[calibration]`` section.
    catalog
        The catalog (the pipeline is its only writer).
    products
        The products layout.
    """

    def __init__(self, config: CalibrationConfig, catalog: Catalog, products: Products) -> None:
        self.config = config
        self.catalog = catalog
        self.products = products
        self._running: dict[str, _Running] = {}
        # (night, setup) whose dark-rate map no longer matches its darks: refitted when
        # something needs it (a flat, a light, the end of a run), not at every dark
        self._stale_rates: set[tuple[str, str]] = set()
        self._stale_bias_health: set[str] = set()  # bias keys whose health is not measured
        self._cache: dict[tuple[int, str | int], np.ndarray] = {}  # master pixels, LRU
        self._hot: tuple[tuple[Any, ...], np.ndarray] | None = None  # the last hot-pixel map
        self._stale_rates |= self._rates_behind_their_darks()

    def _rates_behind_their_darks(self) -> set[tuple[str, str]]:
        """After a crash: (night, setup) whose darks or bias changed after its dark-rate
        map was last fitted (the in-memory note was lost), so the hot-pixel map the lights
        get is the one an uninterrupted run would have given them."""
        newest: dict[tuple[str, str], int] = {}  # the newest input of each rate map
        fitted: dict[tuple[str, str], int] = {}
        for m in self.catalog.masters("kind in ('dark', 'darkrate') and status = 'current'"):
            key = (m["night"], m["setup"])
            if m["kind"] == "darkrate":
                fitted[key] = m["id"]
            else:
                newest[key] = max(newest.get(key, 0), m["id"])
        for m in self.catalog.masters("kind = 'bias' and status = 'current'"):
            key = (m["night"], m["setup"])
            if key in newest:  # a bias alone needs no rate map
                newest[key] = max(newest[key], m["id"])
        return {key for key, mid in newest.items() if fitted.get(key, 0) < mid}

    def flush(self) -> list[int]:
        """Bring derived products up to date (dark-rate maps, bias health).

        Returns the ids of the masters written.
        """
        out = []
        for night, setup in sorted(self._stale_rates):
            out += self._refresh_dark_rate(night, setup)
        self._stale_rates.clear()
        for key in sorted(self._stale_bias_health):
            _, night, setup = key.split("|")
            self._health_bias(night, setup, self._running[key])
        self._stale_bias_health.clear()
        return out

    # ------------------------------------------------------------------ makers

    def add(self, frame: dict[str, Any], data: np.ndarray) -> CalDecision:
        """Fold one recorded calibration frame into its master and publish the result.

        Parameters
        ----------
        frame
            The frame's catalog row (type, night, setup, exptime, filter, ...).
        data
            Its raw pixels.
        """
        kind = frame["type"]
        night, setup = frame["night"], frame["setup"]
        if kind == "bias":
            return self._add_running(frame, data, master_key("bias", night, setup))
        if kind in ("dark", "darkflat"):
            reason = self._temperature_problem(frame)
            if reason:
                return CalDecision("rejected", reason, None)
            key = master_key(kind, night, setup, exptime=frame["exptime"])
            return self._add_running(frame, data, key)
        if kind == "flat":
            return self._add_flat(frame, data)
        raise ValueError(f"not a calibration frame: {kind}")

    def _temperature_problem(self, frame: dict[str, Any]) -> str | None:
        ccd, set_temp = frame.get("ccd_temp"), frame.get("set_temp")
        if ccd is None or set_temp is None:
            return None
        off = ccd - set_temp
        if abs(off) > self.config.dark_temperature_tolerance:
            return (
                f"sensor at {ccd:.1f} C, {off:+.1f} C off its set point {set_temp:.1f} C "
                f"(tolerance {self.config.dark_temperature_tolerance:g} C)"
            )
        return None

    def _add_running(self, frame: dict[str, Any], data: np.ndarray, key: str) -> CalDecision:
        running = self._restore(key, frame)
        result = running.master.add(data)
        running.frame_ids.append(frame["id"])
        details: dict[str, Any] = {
            "n": result.n,
            "outlier_fraction": round(result.verdict.outlier_fraction, 5),
            "offset": round(result.verdict.offset, 3),
            "noise": round(result.verdict.noise, 3),
        }
        if frame["type"] == "bias":
            self._pair_read_noise(running, data)
        for revised in result.revised:  # warm-up verdicts the majority changed
            fid = running.frame_ids[revised.index]
            status = "used" if revised.accepted else "flagged"
            self.catalog.update_frame(fid, {"status": status, "reason": revised.reason})
            self.catalog.log_event(
                "calibration",
                status,
                revised.reason or "reinstated by the majority",
                frame_id=fid,
            )
        if not result.accepted:
            return CalDecision("flagged", result.verdict.reason, key, details=details)
        published = self._publish_running(key, frame)
        return CalDecision("used", None, key, published=published, details=details)

    def _pair_read_noise(self, running: _Running, data: np.ndarray) -> None:
        raw = np.asarray(data, np.float32)
        if running.previous_raw is not None:
            running.read_noise.append(camera.read_noise([running.previous_raw, raw]))
            running.previous_raw = None  # independent pairs: (0, 1), (2, 3), ...
        else:
            running.previous_raw = raw

    def _restore(self, key: str, frame: dict[str, Any]) -> _Running:
        """The running master of ``key``; after a restart, rebuilt from its raw frames."""
        if key in self._running:
            return self._running[key]
        kind = key.split("|", 1)[0]
        shape = (frame["ny"], frame["nx"])
        running = _Running(
            RunningMaster(
                shape,
                kind="bias" if kind == "bias" else "dark",
                warmup=self.config.warmup,
                clip=self.config.clip_sigma,
            )
        )
        earlier = self.catalog.frames(
            "master_key = ? and status in ('used', 'flagged') and id != ?", [key, frame["id"]]
        )
        for row in earlier:
            try:
                raw = read_raw(row["path"])
            except (BadFrame, OSError) as exc:
                logger.warning("{}: cannot re-read for {}: {}", row["path"], key, exc)
                continue
            running.master.add(raw.data)
            running.frame_ids.append(row["id"])
            if kind == "bias":
                self._pair_read_noise(running, raw.data)
        if earlier:
            logger.info("{}: rebuilt from {} frames after a restart", key, len(earlier))
        self._running[key] = running
        return running

    def _publish_running(self, key: str, frame: dict[str, Any]) -> list[int]:
        """Write the refreshed bias or dark, and what depends on it."""
        kind, night, setup = frame["type"], frame["night"], frame["setup"]
        running = self._running[key]
        published: list[int] = []
        if kind == "bias":
            published.append(self._write_bias(key, frame, running))
            published += self._refresh_darks(night, setup)
            published += self._pending_flats(night, setup)
            self._stale_bias_health.add(key)
        else:
            bias = self._bias_for(night, setup)
            if bias is None:
                logger.info("{}: dark master waits for a master bias", key)
                return published
            published.append(self._write_dark(key, frame, running, bias))
            if kind == "dark":
                self._stale_rates.add((night, setup))
        return published

    def _write_bias(self, key: str, frame: dict[str, Any], running: _Running) -> int:
        rm = running.master
        stats = {
            "level": float(np.median(rm.master)),
            "noise_adu": rm.noise.read_noise,
            "n_frames": rm.n,
        }
        return self._write_master(
            key, frame, rm.master, rm.sigma, running.frame_ids, depends=[], stats=stats
        )

    def _write_dark(
        self, key: str, frame: dict[str, Any], running: _Running, bias: dict[str, Any]
    ) -> int:
        bias_data = self.load(bias)
        dark = running.master.master - bias_data
        stats = {"median_adu": float(np.median(dark)), "n_frames": running.master.n}
        return self._write_master(
            key, frame, dark, running.master.sigma, running.frame_ids, [bias["id"]], stats
        )

    def _refresh_darks(self, night: str, setup: str) -> list[int]:
        """Re-subtract a refreshed bias from the running darks of this night and setup."""
        out = []
        prefix = ("dark|" + night + "|" + setup + "|", "darkflat|" + night + "|" + setup + "|")
        bias = self._bias_for(night, setup)
        for key, running in self._running.items():
            if key.startswith(prefix) and running.master.n and bias is not None:
                row = self._frame_like(key, night, setup)
                out.append(self._write_dark(key, row, running, bias))
        if any(key.startswith(prefix[0]) for key in self._running):
            self._stale_rates.add((night, setup))
        return out

    def _frame_like(self, key: str, night: str, setup: str) -> dict[str, Any]:
        kind, _, _, exptime = key.split("|")
        return {"type": kind, "night": night, "setup": setup, "exptime": float(exptime)}

    def _refresh_dark_rate(self, night: str, setup: str) -> list[int]:
        """Fit the dark-current rate map across this night's dark masters."""
        darks = self.catalog.masters(
            "kind = 'dark' and night = ? and setup = ? and status = 'current'", [night, setup]
        )
        if not darks:
            return []
        bias = self._bias_for(night, setup)
        stack = {d["exptime"]: self.load(d) for d in darks}
        sigma = {d["exptime"]: self.load(d, "SIGMA") for d in darks}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            rate = fit_dark_rate(stack, sigma=sigma, bias_sigma=self.load(bias, "SIGMA"))
        hot = hot_pixel_map(rate.rate, sigma=rate.sigma)
        stats = {
            "median_rate_adu_s": float(np.median(rate.rate)),
            "hot_pixels": int(hot.sum()),
            "model": rate.model,
            "exptimes": list(rate.exptimes),
        }
        key = master_key("darkrate", night, setup)
        inputs = sorted({i for d in darks for i in d["inputs"]})
        frame = {"type": "darkrate", "night": night, "setup": setup}
        extra = [
            fits.ImageHDU(rate.offset, name="OFFSET"),
            fits.ImageHDU(hot.astype(np.uint8), name="HOTPIX"),
        ]
        mid = self._write_master(
            key,
            frame,
            rate.rate,
            rate.sigma,
            inputs,
            [d["id"] for d in darks] + [bias["id"]],
            stats,
            extra=extra,
            unit="adu/s",
        )
        self._health_dark(night, setup, rate, hot)
        return [mid]

    def _add_flat(self, frame: dict[str, Any], data: np.ndarray) -> CalDecision:
        night, setup, filt = frame["night"], frame["setup"], frame["filter"]
        key = master_key("flat", night, setup, filter=filt)
        bias = self._bias_for(night, setup)
        if bias is None:
            return CalDecision("used", None, key, details={"waiting": "bias"})
        return self._combine_flats(key, frame, bias, data)

    def _pending_flats(self, night: str, setup: str) -> list[int]:
        """Flats that arrived before any bias: combine them now that one exists."""
        out = []
        waiting = self.catalog.frames(
            "type = 'flat' and night = ? and setup = ? and status = 'used'", [night, setup]
        )
        bias = self._bias_for(night, setup)
        for key in sorted({row["master_key"] for row in waiting}):
            if self.catalog.current_master(key) is None and bias is not None:
                last = [row for row in waiting if row["master_key"] == key][-1]
                decision = self._combine_flats(key, last, bias)
                self.catalog.update_frame(
                    last["id"], {"status": decision.status, "reason": decision.reason}
                )
                out += decision.published
        return out

    def _combine_flats(
        self,
        key: str,
        frame: dict[str, Any],
        bias: dict[str, Any],
        data: np.ndarray | None = None,
    ) -> CalDecision:
        """Recombine every flat of this filter, night and setup (flats are few).

        ``frame`` is the newest flat (its pixels in ``data`` when already in hand).
        """
        night, setup = frame["night"], frame["setup"]
        self.flush()
        rows = self.catalog.frames(
            "master_key = ? and status in ('used', 'flagged', 'rejected') and id != ?",
            [key, frame["id"]],
        )
        raws, kept = [], []
        for row in [*rows, frame]:
            try:
                raws.append(
                    data if row is frame and data is not None else read_raw(row["path"]).data
                )
                kept.append(row)
            except (BadFrame, OSError) as exc:
                logger.warning("{}: cannot re-read for {}: {}", row["path"], key, exc)
        if not kept or kept[-1] is not frame:
            return CalDecision("rejected", "cannot be read again for the flat combine", key)
        bias_data = self.load(bias)
        fates: dict[int, tuple[str, str | None]] = {}
        good = []
        for i, band in enumerate(camera.row_banding([r - bias_data for r in raws])):
            if band > self.config.flat_max_banding:
                fates[kept[i]["id"]] = (
                    "rejected",
                    f"horizontal banding: rows vary by {100 * band:.1f} % rms against the "
                    "other flats (rolling shutter under flickering light?)",
                )
            else:
                good.append(i)
        darkflat = self.catalog.nearest_masters(
            "darkflat", setup, night, self.config.dark_max_age_days, exptime=frame["exptime"]
        )
        dark = darkflat[0] if darkflat else self._dark_for(night, setup, None)
        result = None
        if good:
            gain = self._known_gain(frame)
            rate = self._dark_rate(dark) if dark else None
            result = combine_flats(
                [raws[i] for i in good],
                bias=bias_data,
                dark=rate,
                exptimes=[kept[i]["exptime"] for i in good] if rate is not None else None,
                gain=gain,
                read_noise=bias["stats"].get("noise_adu") if gain else None,
                saturation=self.config.saturation,
                min_snr=self.config.flat_min_snr,
            )
            for i, verdict in zip(good, result.verdicts, strict=True):
                fates[kept[i]["id"]] = ("used" if verdict.accepted else "rejected", verdict.reason)
        for row in kept[:-1]:  # earlier flats whose fate this flat changed
            status, reason = fates[row["id"]]
            if (row["status"], row["reason"]) != (status, reason):
                self.catalog.update_frame(row["id"], {"status": status, "reason": reason})
                self.catalog.log_event("calibration", status, reason, frame_id=row["id"])
        decision = CalDecision(*fates[frame["id"]], key)
        if result is None or result.n == 0:
            return decision
        accepted = [good[j] for j, v in enumerate(result.verdicts) if v.accepted]
        stats = {
            "n_frames": result.n,
            "levels": [round(v.level, 1) for v in result.verdicts if v.accepted],
            "vignetting": camera.vignetting(result.master),
        }
        depends = [bias["id"]] + ([dark["id"]] if dark else [])
        used = [kept[i]["id"] for i in accepted]
        decision.published.append(
            self._write_master(key, frame, result.master, result.sigma, used, depends, stats)
        )
        partners = [raws[i] for i in accepted if kept[i] is not frame]
        new = raws[-1] if kept[-1]["id"] in used else None
        self._health_flat(frame, result.master, new, partners, bias_data, bias)
        return decision

    # ---------------------------------------------------------------- writing

    def _write_master(
        self,
        key: str,
        frame: dict[str, Any],
        image: np.ndarray,
        sigma: np.ndarray | None,
        inputs: list[int],
        depends: list[int],
        stats: dict[str, Any],
        *,
        extra: list[fits.ImageHDU] | None = None,
        unit: str = "adu",
    ) -> int:
        kind, night, setup = frame["type"], frame["night"], frame["setup"]
        exptime = frame.get("exptime") if kind in ("dark", "darkflat") else None
        filt = frame.get("filter") if kind == "flat" else None
        previous = self.catalog.current_master(key)
        version = previous["version"] + 1 if previous else 1
        current = self.products.master(night, kind, setup, exptime=exptime, filter=filt)
        path = self.products.master(
            night, kind, setup, exptime=exptime, filter=filt, version=version
        )

        header = fits.Header()
        header["IMAGETYP"] = _IMAGETYP[kind]
        header["NCOMBINE"] = (len(inputs), "raw frames combined")
        header["NIGHT"] = (night, "local date of the evening")
        header["SETUP"] = setup
        header["MVERSION"] = (version, "master version (observd catalog)")
        header["BUNIT"] = unit
        if exptime is not None:
            header["EXPTIME"] = (exptime, "s")
        if filt is not None:
            header["FILTER"] = filt
        header["CREATOR"] = f"observd {__version__}"
        for dep in depends:
            dep_row = self.catalog.master(dep)
            header.add_history(
                f"uses {dep_row['kind']} v{dep_row['version']} {Path(dep_row['path']).name}"
            )
        # the inputs by name (the catalog's masters.inputs has them all): one query, and
        # a bounded header, so the 500th bias of a long series costs what the 5th did
        shown = inputs[-_MAX_INPUT_CARDS:]
        names = {
            r["id"]: Path(r["path"]).name
            for r in self.catalog.db.query(
                f"select id, path from frames where id in ({','.join('?' * len(shown))})", shown
            )
        }
        if len(inputs) > len(shown):
            header.add_history(f"inputs: {len(inputs)} frames, the last {len(shown)} below")
        for fid in shown:
            header.add_history(f"input {names.get(fid, fid)}")
        hdus = [fits.PrimaryHDU(np.asarray(image, np.float32), header)]
        if sigma is not None:
            hdus.append(fits.ImageHDU(np.asarray(sigma, np.float32), name="SIGMA"))
        hdus += extra or []
        atomic_write_fits(path, fits.HDUList(hdus))
        _link_current(path, current)

        mid = self.catalog.insert_master(
            {
                "kind": kind,
                "night": night,
                "setup": setup,
                "filter": filt,
                "exptime": exptime,
                "master_key": key,
                "version": version,
                "path": str(path),
                "current_path": str(current),
                "n_frames": len(inputs),
                "inputs": inputs,
                "depends": depends,
                "stats": stats,
            }
        )
        if previous and not previous["used"]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(previous["path"])  # nobody used it: the new version replaces it
        self.catalog.log_event(
            "calibration",
            "master",
            f"{key} v{version} from {len(inputs)} frames",
            details={"master_id": mid, **stats},
        )
        logger.info("master {} v{} ({} frames) -> {}", key, version, len(inputs), current.name)
        return mid

    # --------------------------------------------------------------- selection

    def _bias_for(self, night: str, setup: str) -> dict[str, Any] | None:
        rows = self.catalog.nearest_masters("bias", setup, night, self.config.bias_max_age_days)
        return rows[0] if rows else None

    def _dark_for(self, night: str, setup: str, exptime: float | None) -> dict[str, Any] | None:
        """The nearest night's dark: an exact-exposure master before a scaled rate map."""
        age = self.config.dark_max_age_days
        candidates = self.catalog.nearest_masters("darkrate", setup, night, age)
        if exptime is not None:
            candidates += self.catalog.nearest_masters("dark", setup, night, age, exptime=exptime)
        if not candidates:
            return None
        return min(
            candidates,
            key=lambda m: (_nights_apart(m["night"], night), m["kind"] == "darkrate", m["night"]),
        )

    def _flat_for(self, night: str, setup: str, filt: str | None) -> dict[str, Any] | None:
        rows = self.catalog.nearest_masters(
            "flat", setup, night, self.config.flat_max_age_days, filter=filt or ""
        )
        return rows[0] if rows else None

    def select(self, light: dict[str, Any]) -> Selection:
        """The masters for a light (a catalog row), or what it waits for.

        Steps already applied upstream (``calstat`` letters B, D, F; ``C`` = all) are
        skipped, never applied twice.
        """
        self.flush()
        calstat = (light.get("calstat") or "").upper()
        done = set("BDF") if "C" in calstat else set(calstat)
        sel = Selection()
        night, setup = light["night"], light["setup"]
        if "B" in done:
            sel.skipped.append("bias")
        else:
            sel.bias = self._bias_for(night, setup)
            if sel.bias is None:
                sel.waiting.append("bias")
        if "D" in done:
            sel.skipped.append("dark")
        else:
            sel.dark = self._dark_for(night, setup, light["exptime"])
            if sel.dark is None:
                sel.waiting.append("dark")
        if "F" in done:
            sel.skipped.append("flat")
        else:
            sel.flat = self._flat_for(night, setup, light["filter"])
            if sel.flat is None:
                sel.waiting.append(f"flat {light['filter']}" if light["filter"] else "flat")
        for step, m in sel._by_step().items():
            if m is not None and m["night"] != night:
                sel.notes.append(f"{step} from {m['night']}")
        return sel

    # ---------------------------------------------------------------- loading

    def load(self, master: dict[str, Any], extension: str | int = 0) -> np.ndarray:
        """A master's pixels (or one of its extensions) as float32, read-only.

        A master version never changes, so the last few read are kept in memory: every
        light of a filter uses the same bias, dark and flat.
        """
        key = (master["id"], extension)
        if key in self._cache:
            self._cache[key] = self._cache.pop(key)  # most recently used last
            return self._cache[key]
        with fits.open(master["path"], memmap=False) as hdul:
            data = np.asarray(hdul[extension].data, dtype=np.float32)
        data.flags.writeable = False
        self._cache[key] = data
        while len(self._cache) > self.config.cache_masters:
            self._cache.pop(next(iter(self._cache)))
        return data

    def _dark_rate(self, dark: dict[str, Any]) -> DarkRate | np.ndarray:
        """A dark master as something :func:`combine_flats` can scale to any exposure."""
        if dark["kind"] == "darkrate":
            return DarkRate(
                rate=self.load(dark),
                offset=self.load(dark, "OFFSET"),
                sigma=None,
                model=dark["stats"].get("model", "origin"),
                exptimes=tuple(dark["stats"].get("exptimes", ())),
            )
        return self.load(dark) / np.float32(dark["exptime"])

    def dark_image(self, dark: dict[str, Any], exptime: float) -> np.ndarray:
        """The bias-subtracted dark for an exposure time, from a dark or a rate map."""
        if dark["kind"] == "darkrate":
            return self._dark_rate(dark).dark(exptime)
        image = self.load(dark)
        if abs(dark["exptime"] - exptime) > 1e-6 * max(1.0, exptime):
            image = image * np.float32(exptime / dark["exptime"])
        return image

    def hot_pixels(self, night: str, setup: str) -> np.ndarray | None:
        """The hot-pixel map of the nearest dark-rate master (bool), if any."""
        self.flush()
        rate = self.catalog.nearest_masters("darkrate", setup, night, self.config.dark_max_age_days)
        if not rate:
            return None
        # every light of the night shares it: built once per master (a full pass)
        key = (rate[0]["id"], rate[0].get("version"), rate[0]["path"])
        if self._hot is None or self._hot[0] != key:
            self._hot = (key, self.load(rate[0], "HOTPIX") > 0)
        return self._hot[1]

    def _known_gain(self, frame: dict[str, Any]) -> float | None:
        rows = self.catalog.camera_health(frame["night"])
        for row in rows:
            if row["setup"] == frame["setup"] and row.get("gain"):
                return row["gain"]
        return None

    # ----------------------------------------------------------------- health

    def _health_bias(self, night: str, setup: str, running: _Running) -> None:
        s = camera.bias_structure(running.master.master)
        values: dict[str, Any] = {
            "bias_level": s.level,
            "bias_row_rms": s.row_rms,
            "bias_col_rms": s.col_rms,
        }
        if running.read_noise:
            values["read_noise_adu"] = float(np.median(running.read_noise))
        self._update_health(night, setup, values)

    def _health_dark(self, night: str, setup: str, rate: DarkRate, hot: np.ndarray) -> None:
        self._update_health(
            night,
            setup,
            {"dark_current_adu": float(np.median(rate.rate)), "hot_pixels": int(hot.sum())},
        )

    def _health_flat(
        self,
        frame: dict[str, Any],
        master: np.ndarray,
        new: np.ndarray | None,
        partners: list[np.ndarray],
        bias_data: np.ndarray,
        bias: dict[str, Any],
    ) -> None:
        """Vignetting, change against the previous night, and gain by photon transfer.

        The gain comes from one new pair per accepted flat (the new flat and the one
        closest to it in level), so its cost does not grow with the number of flats;
        the night's gain is the median over all pairs of all filters.
        """
        night, setup, filt = frame["night"], frame["setup"], frame["filter"] or ""
        flats = self._health_row(night, setup).get("flats") or {}
        entry: dict[str, Any] = {**flats.get(filt, {}), "vignetting": camera.vignetting(master)}
        if new is not None and partners:
            level = float(np.median(new))
            partner = min(partners, key=lambda p: abs(float(np.median(p)) - level))
            with contextlib.suppress(ValueError):  # no usable pair: levels too far apart
                g = camera.gain_from_flats(
                    [new, partner],
                    bias_data,
                    read_noise_adu=bias["stats"].get("noise_adu"),
                    saturation=self.config.saturation,
                )
                if np.isfinite(g.gain):
                    entry["gain_pairs"] = [*entry.get("gain_pairs", []), g.gain]
        previous = self._previous_flat(night, setup, filt)
        if previous is not None:
            change = camera.flat_change(
                master,
                self.load(previous),
                warn=self.config.flat_change_warn,
                alarm=self.config.flat_change_alarm,
            )
            entry.update(
                previous_night=previous["night"],
                change_rms=change.rms,
                change_peak=change.peak,
                change_status=change.status,
            )
        flats[filt] = entry
        values: dict[str, Any] = {"flats": flats}
        pairs = [g for e in flats.values() for g in e.get("gain_pairs", [])]
        if pairs:
            values["gain"] = float(np.median(pairs))
            values["gain_error"] = (
                float(np.std(pairs) / np.sqrt(len(pairs))) if len(pairs) > 1 else None
            )
        self._update_health(night, setup, values)

    def _previous_flat(self, night: str, setup: str, filt: str) -> dict[str, Any] | None:
        rows = self.catalog.db.execute(
            "select id from masters where kind = 'flat' and setup = ? and filter = ? and "
            "status = 'current' and night < ? order by night desc limit 1",
            [setup, filt, night],
        ).fetchall()
        return self.catalog.master(rows[0][0]) if rows else None

    def _health_row(self, night: str, setup: str) -> dict[str, Any]:
        for row in self.catalog.camera_health(night):
            if row["setup"] == setup:
                return row
        return {}

    def _update_health(self, night: str, setup: str, values: dict[str, Any]) -> None:
        row = {**self._health_row(night, setup), **values}
        gain = row.get("gain")
        if gain:
            if row.get("read_noise_adu") is not None:
                values["read_noise_e"] = row["read_noise_adu"] * gain
            if row.get("dark_current_adu") is not None:
                values["dark_current_e"] = row["dark_current_adu"] * gain
        values["warnings"] = _health_warnings({**row, **values})
        self.catalog.upsert_camera(night, setup, values)


def _health_warnings(row: dict[str, Any]) -> list[str]:
    out = []
    for filt, entry in (row.get("flats") or {}).items():
        status = entry.get("change_status")
        if status in ("warn", "alarm"):
            out.append(
                f"flat {filt} changed by {100 * entry['change_peak']:.1f} % (peak; rms "
                f"{100 * entry['change_rms']:.2f} %) since {entry['previous_night']}"
                + (" — ALARM" if status == "alarm" else "")
            )
    return out


_MAX_INPUT_CARDS = 50
"""Input frames named in a master's HISTORY; the catalog lists every one."""


def _link_current(version_path: Path, current: Path) -> None:
    """Make the contract name point at this version (a hard link; a copy if links fail)."""
    tmp = current.with_name(f".{current.name}.link")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        os.link(version_path, tmp)
    except OSError:
        atomic_write_fits(tmp, fits.open(version_path, memmap=False))
    os.replace(tmp, current)


def _nights_apart(a: str, b: str) -> int:
    from datetime import date

    return abs((date.fromisoformat(a) - date.fromisoformat(b)).days)
