"""loguru set-up: one line per event to stderr (journald) and a rotating file."""

from __future__ import annotations

import sys
from pathlib import Path

from loguru import logger
from tqdm import tqdm

__all__ = ["setup_logging"]

_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level:<7} {message}"


def setup_logging(level: str = "INFO", log_dir: Path | None = None, *, tqdm_safe: bool = False):
    """Send log lines to stderr and, when ``log_dir`` is given, to ``observd.log`` there.

    ``tqdm_safe`` routes stderr lines through ``tqdm.write`` so they do not tear a
    progress bar apart.
    """
    logger.remove()
    if tqdm_safe:
        logger.add(
            lambda msg: tqdm.write(msg, end="", file=sys.stderr), level=level, format=_FORMAT
        )
    else:
        logger.add(sys.stderr, level=level, format=_FORMAT)
    if log_dir is not None:
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            logger.add(
                log_dir / "observd.log",
                level="DEBUG",
                format=_FORMAT,
                rotation="20 MB",
                retention=10,
                enqueue=False,
            )
        except OSError as exc:
            logger.warning("cannot write a log file in {}: {}", log_dir, exc)
