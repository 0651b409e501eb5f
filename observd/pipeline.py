"""The pipeline worker: the one place where the stages are wired together.

A settled path enters here and flows forward through the stages; the worker is the
only writer of the catalog and the products. ``observd ingest`` and the daemon both
use it, so a night re-run in the morning goes through exactly the code that ran live.
"""

from __future__ import annotations

from pathlib import Path

from loguru import logger

from observd.calibration import Calibrations
from observd.catalog import Catalog
from observd.config import Config
from observd.ingest import Ingested, ingest_file
from observd.lights import Aligned, LightStage
from observd.products import Products

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
        self.stacked: list[Aligned] = []

    def process(self, path: str | Path) -> Ingested | None:
        """Take one settled file through the stages; None when it vanished first."""
        result = ingest_file(path, self.catalog, self.config)
        if result is None or not result.new or result.status != "recorded":
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

    def finish(self) -> None:
        """End of a run or a night: masters up to date, waiting lights processed."""
        self.calibrations.flush()
        self.lights.finish()

    def _stack(self, aligned: Aligned) -> None:
        self.stacked.append(aligned)

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
