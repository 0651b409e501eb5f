"""The pipeline worker: the one place where the stages are wired together.

A settled path enters here and flows forward through the stages; the worker is the
only writer of the catalog and the products. ``observd ingest`` and the daemon both
use it, so a night re-run in the morning goes through exactly the code that ran live.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from loguru import logger

from observd.calibration import Calibrations
from observd.catalog import Catalog
from observd.coadds import Coadds
from observd.config import Config
from observd.ingest import Ingested, ingest_file
from observd.lights import Aligned, LightStage
from observd.memory import heap_bytes, keep_freed_memory, reserve_heap
from observd.products import Products
from observd.rawio import BadFrame, read_raw

__all__ = ["Pipeline"]

CALIBRATION_TYPES = ("bias", "dark", "darkflat", "flat")

Progress = Callable[[], None]
"""Called between the lights of a long rebuild (the daemon's watchdog ping)."""

NIGHT_BYTES_PER_PIXEL = 300
"""The process's heap at its high-water mark over a night, per pixel of the camera's
frame: masters, one light's arrays, a coadd (sums, warm-up frames, a spare checkpoint
set) and its products. Measured on simulated nights of one target: 303 B at 2048 px,
307 B at 4096 px (``bench/run.py``). See :meth:`Pipeline.reserve_memory`."""

RESERVE_SHARE = 0.5
"""At most this share of the memory available when the reserve is made."""


class Pipeline:
    """Take frames through the stages, one at a time.

    Parameters
    ----------
    config
        The effective configuration.
    catalog
        The open catalog; the pipeline is its only writer.
    """

    def __init__(self, config: Config, catalog: Catalog) -> None:
        keep_freed_memory()  # each light's frame-sized arrays are reused by the next
        self.config = config
        self.catalog = catalog
        self.products = Products(config.paths.products)
        self.calibrations = Calibrations(config.calibration, catalog, self.products)
        self.lights = LightStage(config, catalog, self.calibrations, stack=self._stack)
        self.coadds = Coadds(config.stack, catalog, self.products)
        self._reserved_pixels = 0
        self.reserve_seconds = 0.0  # time spent reserving working memory (benchmarks)
        self._resume_coadds()

    def reserve_memory(self, shape: tuple[int, ...]) -> None:
        """Have the heap hold the working memory of a night of frames of this shape
        (:data:`NIGHT_BYTES_PER_PIXEL`), every page touched; once per larger size.

        :meth:`process` calls it at the first frame of a size, at dusk a bias, where
        nobody waits: otherwise the first lights of the first coadd grow the heap by
        ~1.8 GB at 4096 px and wait for its page faults, 1-2 s each on a virtual machine
        that hands free memory back to its host (see :mod:`observd.memory`).
        """
        pixels = int(np.prod(shape[-2:])) if len(shape) >= 2 else 0
        if pixels <= self._reserved_pixels:
            return
        self._reserved_pixels = pixels
        want = NIGHT_BYTES_PER_PIXEL * pixels
        available = _available_memory()
        if available is not None:
            want = min(want, (heap_bytes() or 0) + int(RESERVE_SHARE * available))
        t0 = time.perf_counter()
        added = reserve_heap(want)
        dt = time.perf_counter() - t0
        self.reserve_seconds += dt
        if added:
            logger.info("working memory for {}x{} px frames: {:.1f} GB reserved in {:.1f} s",
                        shape[-1], shape[-2], added / 2**30, dt)  # fmt: skip

    def process(self, path: str | Path) -> Ingested | None:
        """Take one settled file through the stages; None when it vanished first."""
        result = ingest_file(path, self.catalog, self.config)
        if result is None or result.status != "recorded":
            return result
        if not result.new:  # recorded before a crash, never taken further: now
            try:
                result.raw = read_raw(path)
            except (BadFrame, OSError) as exc:
                logger.warning("{}: cannot be read again: {}", path, exc)
                return result
        self.reserve_memory(result.raw.data.shape)
        frame = self.catalog.frame(result.frame_id)
        if frame["type"] in CALIBRATION_TYPES:
            self._calibration_frame(frame, result)
            self.lights.retry_waiting()
        elif frame["type"] == "light":
            try:
                self.lights.process(frame, result.raw.data, result.raw.header)
            except Exception as exc:  # one bad frame must not stop the night
                logger.exception("{}: light processing failed", frame["path"])
                self._fail(frame, "light", exc)
        return result

    def idle(self) -> None:
        """Nothing to process just now: stacks changed since their last write are
        published, and the catalog learns of the products and checkpoints written in the
        background since the last light."""
        self.coadds.publish_pending()

    def finish(self) -> None:
        """End of a run or a night: masters up to date, waiting lights processed, stacks
        whose masters were superseded rebuilt, every coadd written."""
        self.calibrations.flush()
        self.lights.finish()
        self.rebuild_stale()
        self.coadds.flush()

    def restack(
        self, night: str, target_slug: str | None = None, *, progress: Progress | None = None
    ) -> int:
        """Rebuild the coadds of a night (or one target) from the raw frames, with the
        masters that are best now; returns the number of lights stacked.

        The lights' verdicts and transforms are kept: only calibration and stacking are
        redone, so a restack after dawn flats or more darks gives the stacks the night
        would have given with those masters from the start.
        """
        self.calibrations.flush()
        targets = [t["id"] for t in self.catalog.targets(night, target_slug)]
        stacked = self._restack_targets(targets, progress)
        what = f"night {night}" + (f", target {target_slug}" if target_slug else "")
        self.catalog.log_event("stack", "restack", what, details={"lights": stacked})
        return stacked

    def stale_targets(self) -> dict[int, list[str]]:
        """Target grids with stacked lights whose best masters are not the ones they were
        calibrated with (dawn flats, more darks, a night's own master replacing an
        earlier night's), each with what changed."""
        self.calibrations.flush()
        stale: dict[int, list[str]] = {}
        for light in self.catalog.lights("f.status in ('stacked', 'accepted')"):
            frame = self.catalog.frame(light["frame_id"])
            now = self.calibrations.select(frame).ids()
            changed = [
                f"{step} {light[f'{step}_id']} -> {m_id}"
                for step, m_id in now.items()
                if m_id is not None and m_id != light[f"{step}_id"]
            ]
            if changed:
                stale.setdefault(light["target_id"], []).extend(
                    f"{Path(frame['path']).name}: {c}" for c in changed[:1]
                )
        return stale

    def rebuild_stale(self, progress: Progress | None = None) -> int:
        """Rebuild, from the raw frames, every coadd whose masters have been superseded
        since its lights were calibrated; returns the number of lights stacked again.

        A later master never patches old pixels (DESIGN.md): the affected coadds are
        made again, so a night's stacks always say exactly which masters they used.
        """
        stale = self.stale_targets()
        if not stale:
            return 0
        for target_id, why in stale.items():
            target = self.catalog.target(target_id)
            logger.info(
                "rebuilding {} of {}: better masters ({} lights, e.g. {})",
                target["name"], target["night"], len(why), why[0],
            )  # fmt: skip
        stacked = self._restack_targets(sorted(stale), progress)
        self.catalog.log_event(
            "stack", "rebuild", "better masters arrived",
            details={"targets": sorted(stale), "lights": stacked},
        )  # fmt: skip
        return stacked

    def _restack_targets(self, target_ids: list[int], progress: Progress | None) -> int:
        self.coadds.reset(target_ids)
        ids = ",".join(str(t) for t in target_ids) or "NULL"
        lights = self.catalog.lights(f"l.target_id in ({ids}) and l.verdict = 'accepted'")
        stacked = 0
        for light in lights:
            frame = self.catalog.frame(light["frame_id"])
            if frame["status"] not in ("stacked", "accepted", "rejected"):
                continue  # held as provisional (stacked at the end), or failed
            try:
                self._stack(self.lights.reconstruct(frame, reselect=True))
                stacked += 1
            except Exception as exc:  # the raw frame vanished, ...
                logger.exception("{}: cannot be stacked again", frame["path"])
                self._fail(frame, "stack", exc)
            if progress is not None:
                progress()
        self.coadds.flush()
        return stacked

    def _stack(self, aligned: Aligned) -> None:
        """Fold an accepted light into its coadd."""
        frame = aligned.frame
        target = self.catalog.target(aligned.target_id)
        (light,) = self.catalog.lights("l.frame_id = ?", [frame["id"]])
        health = [
            h for h in self.catalog.camera_health(frame["night"]) if h["setup"] == frame["setup"]
        ]
        common = dict(
            frame=frame,
            target=target,
            grid=self.lights.grid(aligned.target_id),
            weight=aligned.weight,
            fwhm=aligned.measurement.fwhm,
            transparency=aligned.transparency,
            gain=health[0].get("gain") if health else None,
            masters=[light["bias_id"], light["dark_id"], light["flat_id"]],
        )
        if aligned.channels is None:
            stacked, reason = self.coadds.add(image=aligned.image, **common)
        else:  # a colour camera: each colour into the target's coadd of that name
            results = self.coadds.add_colour(channels=aligned.channels, **common)
            refused = [
                f"{name}: {why}"
                for name, (ok, why) in results.items()
                if not ok and why != "already in the coadd"  # re-added after a crash
            ]
            stacked = len(refused) < len(results)
            reason = "; ".join(refused) or None
        status = "stacked" if stacked else "rejected"
        with self.catalog.transaction():
            self.catalog.update_frame(
                frame["id"],
                {"status": status, "reason": reason if not stacked else frame.get("reason")},
            )
            self.catalog.log_event("stack", status, reason, frame_id=frame["id"])

    def _resume_coadds(self) -> None:
        """After a crash: frames stacked after a coadd's last checkpoint are added again,
        once, and provisional frames (held in memory) are held again."""
        for frame in self.catalog.frames("type = 'light' and status = 'provisional'"):
            try:
                self.lights.hold(self.lights.reconstruct(frame))
            except Exception as exc:  # the raw frame vanished, ...
                logger.exception("{}: cannot be held again", frame["path"])
                self._fail(frame, "light", exc)
        held: dict[tuple[int, str], set[int]] = {
            (row["target_id"], row["filter"]): set(json.loads(row["checkpoint_frames"] or "[]"))
            for row in self.catalog.db["coadds"].rows
        }

        def in_checkpoints(light: dict) -> bool:
            own = held.get((light["target_id"], light["filter"] or ""), ())
            if light["frame_id"] in own:
                return True
            # a colour camera's frame is in three coadds, R, G and B
            colour = [held.get((light["target_id"], c)) for c in "RGB"]
            return all(c is not None and light["frame_id"] in c for c in colour) and bool(
                self.catalog.frame(light["frame_id"])["bayer"]
            )

        missing = [
            light
            for light in self.catalog.lights("f.status in ('stacked', 'accepted')")
            if not in_checkpoints(light)
        ]
        for light in missing:
            frame = self.catalog.frame(light["frame_id"])
            try:
                self._stack(self.lights.reconstruct(frame))
            except Exception as exc:  # the raw frame vanished, ...
                logger.exception("{}: cannot be stacked again", frame["path"])
                self._fail(frame, "stack", exc)
        if missing:
            logger.info("{} frames stacked after the last checkpoints added again", len(missing))

    def _calibration_frame(self, frame: dict, result: Ingested) -> None:
        try:
            decision = self.calibrations.add(frame, result.raw.data)
        except Exception as exc:  # one bad frame must not stop the night
            logger.exception("{}: calibration failed", frame["path"])
            self._fail(frame, "calibration", exc)
            return
        with self.catalog.transaction():
            self.catalog.update_frame(
                frame["id"],
                {
                    "status": decision.status,
                    "reason": decision.reason,
                    "master_key": decision.master_key,
                },
            )
            self.catalog.log_event(
                "calibration",
                decision.status,
                decision.reason,
                frame_id=frame["id"],
                details={"master": decision.master_key, **decision.details},
            )
        result.status, result.reason = decision.status, decision.reason
        if decision.status != "used":
            logger.warning("{}: {}: {}", Path(frame["path"]).name, decision.status, decision.reason)

    def _fail(self, frame: dict, stage: str, exc: Exception) -> None:
        reason = f"{stage} failed: {type(exc).__name__}: {exc}"
        self.catalog.update_frame(frame["id"], {"status": "failed", "reason": reason})
        self.catalog.log_event(stage, "failed", reason, frame_id=frame["id"])


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
