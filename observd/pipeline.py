"""The pipeline worker: the one place where the stages are wired together.

A settled path enters here and flows forward through the stages; the worker is the
only writer of the catalog and the products. ``observd ingest`` and the daemon both
use it, so a night re-run in the morning goes through exactly the code that ran live.
"""

from __future__ import annotations

import json
from pathlib import Path

from loguru import logger

from observd.calibration import Calibrations
from observd.catalog import Catalog
from observd.coadds import Coadds
from observd.config import Config
from observd.ingest import Ingested, ingest_file
from observd.lights import Aligned, LightStage
from observd.products import Products
from observd.rawio import BadFrame, read_raw

__all__ = ["Pipeline"]

CALIBRATION_TYPES = ("bias", "dark", "darkflat", "flat")


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
        self.config = config
        self.catalog = catalog
        self.products = Products(config.paths.products)
        self.calibrations = Calibrations(config.calibration, catalog, self.products)
        self.lights = LightStage(config, catalog, self.calibrations, stack=self._stack)
        self.coadds = Coadds(config.stack, catalog, self.products)
        self._resume_coadds()

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
        """Nothing to process just now: the catalog learns of the coadd products and
        checkpoints written in the background since the last light."""
        self.coadds.collect()

    def finish(self) -> None:
        """End of a run or a night: masters up to date, waiting lights processed."""
        self.calibrations.flush()
        self.lights.finish()
        self.coadds.flush()

    def restack(self, night: str, target_slug: str | None = None) -> int:
        """Rebuild the coadds of a night (or one target) from the raw frames, with the
        masters that are best now; returns the number of lights stacked.

        The lights' verdicts and transforms are kept: only calibration and stacking are
        redone, so a restack after dawn flats or more darks gives the stacks the night
        would have given with those masters from the start.
        """
        self.calibrations.flush()
        targets = self.catalog.targets(night, target_slug)
        self.coadds.reset([t["id"] for t in targets])
        ids = ",".join(str(t["id"]) for t in targets) or "NULL"
        lights = self.catalog.lights(f"l.target_id in ({ids}) and l.verdict = 'accepted'")
        stacked = 0
        for light in lights:
            frame = self.catalog.frame(light["frame_id"])
            try:
                self._stack(self.lights.reconstruct(frame, reselect=True))
                stacked += 1
            except Exception as exc:  # the raw frame vanished, ...
                logger.exception("{}: cannot be stacked again", frame["path"])
                self._fail(frame, "stack", exc)
        self.coadds.flush()
        self.catalog.log_event("stack", "restack", f"night {night}"
                               + (f", target {target_slug}" if target_slug else ""),
                               details={"lights": stacked})  # fmt: skip
        return stacked

    def _stack(self, aligned: Aligned) -> None:
        """Fold an accepted light into its coadd."""
        frame = aligned.frame
        target = self.catalog.target(aligned.target_id)
        (light,) = self.catalog.lights("l.frame_id = ?", [frame["id"]])
        health = [
            h for h in self.catalog.camera_health(frame["night"]) if h["setup"] == frame["setup"]
        ]
        stacked, reason = self.coadds.add(
            frame=frame,
            target=target,
            grid=self.lights.grid(aligned.target_id),
            image=aligned.image,
            weight=aligned.weight,
            fwhm=aligned.measurement.fwhm,
            transparency=aligned.transparency,
            gain=health[0].get("gain") if health else None,
            masters=[light["bias_id"], light["dark_id"], light["flat_id"]],
        )
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
        missing = [
            light
            for light in self.catalog.lights("f.status in ('stacked', 'accepted')")
            if light["frame_id"] not in held.get((light["target_id"], light["filter"] or ""), ())
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
