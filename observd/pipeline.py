"""The pipeline worker: the one place where the stages are wired together.

A settled path enters here and flows forward through the stages; the worker is the
only writer of the catalog and the products. ``observd ingest`` and the daemon both
use it, so a night re-run in the morning goes through exactly the code that ran live.
"""

from __future__ import annotations

from pathlib import Path

from observd.catalog import Catalog
from observd.config import Config
from observd.ingest import Ingested, ingest_file

__all__ = ["Pipeline"]


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

    def process(self, path: str | Path) -> Ingested | None:
        """Record one settled file; None when it vanished before it could be read."""
        return ingest_file(path, self.catalog, self.config)
