"""Fetching a dataset from an http(s) URL, with a timeout and messages that say what went wrong."""

from __future__ import annotations

import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath

from deeptune_trainer.errors import TrainerInputError

DOWNLOAD_TIMEOUT_S = 60.0
"""Per socket operation: a stalled server fails the run within a minute instead of hanging it."""


def download(url: str, directory: Path, *, where: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Save the URL's body under `directory`, keeping the file name so the format can be told by it."""
    name = PurePosixPath(urllib.parse.urlsplit(url).path).name or "dataset"
    target = directory / name
    request = urllib.request.Request(url, headers={"User-Agent": "deeptune-trainer"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, target.open("wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except urllib.error.HTTPError as error:
        reason = "DatasetNotFound" if error.code in (404, 410) else "DatasetUnreachable"
        raise TrainerInputError(
            reason,
            f"{where}: {url} answered HTTP {error.code} {error.reason}; check the URL, and that it "
            "can be read without credentials",
        ) from None
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        cause = error.reason if isinstance(error, urllib.error.URLError) else error
        if isinstance(cause, TimeoutError):
            cause = f"timed out after {timeout:g}s"
        raise TrainerInputError("DatasetUnreachable", f"{where}: could not download {url}: {cause}") from None
    return target
