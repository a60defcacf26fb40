"""Fetching a dataset's files from the Hugging Face Hub: one revision, one split, into the run's cache.

huggingface_hub does the transfer, the revision pinning, the token and the cache; the files are then
read by this package's own parsers, so a bad row is reported by its file and line as for any source.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import httpx
from huggingface_hub import HfApi, constants, scan_cache_dir, snapshot_download
from huggingface_hub import errors as hub_errors

from deeptune.api.finetunejob import HubDataset
from deeptune_trainer.data.formats import EXTENSIONS
from deeptune_trainer.errors import TrainerInputError

SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}
"""Other names files use for a split, as the `datasets` library's naming convention accepts them."""
WORD_BREAK = re.compile(r"[/\-._ 0-9]+")
LISTED_FILES = 10


@dataclass(frozen=True)
class HubFiles:
    """The local copies of one split's files, and the commit they were read at."""

    commit: str
    files: list[Path]
    names: list[str]
    """The files' paths in the repository, in the order they are read."""


def is_data_file(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in EXTENSIONS


def split_files(names: list[str], split: str) -> list[str]:
    """The data files of `split` by the Hub's convention: a path naming the split (or an alias of it)
    as a word. A repository whose files name no split at all is all `train`."""
    data = sorted(name for name in names if is_data_file(name))
    known = {alias for aliases in SPLIT_ALIASES.values() for alias in aliases} | {"train"}
    words = {
        name: set(WORD_BREAK.split(PurePosixPath(name).with_suffix("").as_posix().lower())) for name in data
    }
    wanted = set(SPLIT_ALIASES.get(split, (split,)))
    chosen = [name for name in data if words[name] & wanted]
    if not chosen and split == "train" and not any(words[name] & known for name in data):
        return data
    return chosen


def _token(env: str) -> str | None:
    """The dataset's own token if its Secret is mounted, else None: huggingface_hub then falls back to
    HF_TOKEN, the base model's."""
    return os.environ.get(env) or None


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:LISTED_FILES])
    return shown + (f" and {len(names) - LISTED_FILES} more" if len(names) > LISTED_FILES else "")


def _select(hub: HubDataset, names: list[str], where: str) -> list[str]:
    if hub.files is not None:
        patterns = hub.files
        chosen = sorted(name for name in names if any(fnmatch.fnmatchcase(name, glob) for glob in patterns))
        field, wanted = f"{where}.files", f"matches {', '.join(patterns)}"
    else:
        chosen = split_files(names, hub.split)
        field, wanted = f"{where}.split", f"belongs to split '{hub.split}'"
    if not chosen:
        data = sorted(name for name in names if is_data_file(name))
        found = (
            f"its data files are {_listing(data)}" if data else "it has no jsonl, json, csv or parquet file"
        )
        raise TrainerInputError(
            "DatasetNotFound",
            f"{field}: no file of {hub.name}@{hub.revision} {wanted}; {found}. "
            f"Set {where}.split or {where}.files to the files to read.",
        )
    unreadable = [name for name in chosen if not is_data_file(name)]
    if unreadable:
        raise TrainerInputError(
            "UnsupportedFormat",
            f"{where}.files: {_listing(unreadable)} of {hub.name} is not jsonl, json, csv or parquet; "
            "narrow the globs to the data files",
        )
    return chosen


def _failure(hub: HubDataset, where: str, error: Exception, endpoint: str) -> TrainerInputError:
    """What went wrong, in the user's terms, with the field to change."""
    name = f"{hub.name}@{hub.revision}"
    if isinstance(error, hub_errors.GatedRepoError):
        return TrainerInputError(
            "DatasetNotFound",
            f"{where}: {hub.name} is gated; accept its terms on the Hub with the account whose token "
            f"{where}.tokenSecretRef names",
        )
    if isinstance(error, hub_errors.RevisionNotFoundError):
        return TrainerInputError(
            "DatasetNotFound", f"{where}.revision: {hub.name} has no branch, tag or commit '{hub.revision}'"
        )
    if isinstance(error, hub_errors.RepositoryNotFoundError):
        return TrainerInputError(
            "DatasetNotFound",
            f"{where}.name: no dataset {hub.name} on the Hub at {endpoint}, or it is private: check the "
            f"name, or set {where}.tokenSecretRef to a token that can read it",
        )
    if isinstance(error, hub_errors.LocalEntryNotFoundError | hub_errors.OfflineModeIsEnabled):
        return TrainerInputError(
            "DatasetUnreachable",
            f"{where}: {name} is not in the cache and HF_HUB_OFFLINE forbids downloading it; unset "
            "HF_HUB_OFFLINE, or put the files on a PVC (dataset.source.pvc)",
        )
    return TrainerInputError(
        "DatasetUnreachable",
        f"{where}: could not reach the Hub at {endpoint} for {name} ({type(error).__name__}: {error}); "
        "check the cluster's egress to the Hub, or put the files on a PVC (dataset.source.pvc)",
    )


def _cached(hub: HubDataset, cache_dir: str | None) -> tuple[str, Path, list[str]]:
    """The commit, snapshot folder and files of the revision a previous download left in the cache."""
    try:
        repos = scan_cache_dir(cache_dir or constants.HF_HUB_CACHE).repos
    except hub_errors.CacheNotFound:
        repos = frozenset()
    for repo in repos:
        if repo.repo_id != hub.name or repo.repo_type != "dataset":
            continue
        for cached in repo.revisions:
            if hub.revision in cached.refs or cached.commit_hash == hub.revision:
                names = [file.file_path.relative_to(cached.snapshot_path).as_posix() for file in cached.files]
                return cached.commit_hash, cached.snapshot_path, names
    raise hub_errors.LocalEntryNotFoundError(f"{hub.name}@{hub.revision} is not in the cache")


def fetch_split(hub: HubDataset, *, where: str, token_env: str, cache_dir: str | None) -> HubFiles:
    """Download (or find in the cache) the files of the split `hub` names. `where` is the spec path of
    the `hub` field, e.g. `dataset.source.hub`; `token_env` the variable its token Secret is mounted as."""
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    token = _token(token_env)
    try:
        if constants.HF_HUB_OFFLINE:
            commit, folder, names = _cached(hub, cache_dir)
            chosen = _select(hub, names, where)
        else:
            info = HfApi(endpoint=endpoint, token=token).dataset_info(hub.name, revision=hub.revision)
            chosen = _select(hub, [sibling.rfilename for sibling in info.siblings or []], where)
            # By the revision's name, not the commit: the cache then maps the name to the commit, so
            # a retry with HF_HUB_OFFLINE finds it. The snapshot's folder is named by its commit.
            folder = Path(
                snapshot_download(
                    hub.name, repo_type="dataset", revision=hub.revision, cache_dir=cache_dir,
                    allow_patterns=chosen, token=token, endpoint=endpoint,
                )
            )  # fmt: skip
            commit = folder.name
    except (hub_errors.HfHubHTTPError, hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled,
            httpx.HTTPError) as error:  # fmt: skip
        raise _failure(hub, where, error, endpoint) from None
    return HubFiles(commit, [folder / name for name in chosen], chosen)
