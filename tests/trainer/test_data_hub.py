"""Datasets from the Hugging Face Hub by name, revision and split, against a Hub on loopback: the
files chosen, the token sent, the cache on the run's volume, and every way it can fail."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants

from deeptune.api.finetunejob import DatasetSpec, DataSource
from deeptune.api.trainer import DATASET_TOKEN_ENV, TrainerPaths
from deeptune_trainer.data.hub import split_files
from deeptune_trainer.data.loading import load_rows
from deeptune_trainer.data.pipeline import prepare_dataset
from deeptune_trainer.data.report import data_report
from deeptune_trainer.errors import TrainerInputError
from tests.trainer.fake_hub import FakeHub, Repo, serve

MAIN = "1" * 40
V1 = "2" * 40


def _jsonl(*pairs: tuple[str, str]) -> bytes:
    return "".join(
        json.dumps({"prompt": p, "completion": c}, ensure_ascii=False) + "\n" for p, c in pairs
    ).encode()


def _parquet(*pairs: tuple[str, str]) -> bytes:
    pa = pytest.importorskip("pyarrow", exc_type=ImportError)
    pq = pytest.importorskip("pyarrow.parquet", exc_type=ImportError)
    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{"prompt": p, "completion": c} for p, c in pairs]), out)
    return out.getvalue()


def _repos() -> dict[str, Repo]:
    main = {
        "README.md": b"# support chats\n",
        "data/train-00000-of-00002.jsonl": _jsonl(("你好", "您好！"), ("hi", "hello")),
        "data/train-00001-of-00002.parquet": _parquet(("退货", "七天内可退")),
        "data/validation-00000-of-00001.jsonl": _jsonl(("bye", "goodbye")),
        "data/test-00000-of-00001.jsonl": _jsonl(("thanks", "you are welcome")),
    }
    v1 = {"train.jsonl": _jsonl(("old", "row"))}
    return {
        "org/chats": Repo({"main": (MAIN, main), "v1": (V1, v1)}),
        "org/gated": Repo({"main": (MAIN, main)}, gated=True),
    }


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """The fake Hub, with the trainer pointed at it and offline mode (which the test environment sets)
    lifted, as in a pod with egress to the Hub."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with serve(_repos()) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


def _source(**hub: object) -> DataSource:
    return DataSource.model_validate({"hub": {"name": "org/chats", **hub}})


def _load(cache: Path, **hub: object) -> list[tuple[int, dict[str, object]]]:
    loaded = load_rows(_source(**hub), None, "auto", where="dataset.source", hub_cache=str(cache))
    assert not loaded.bad
    return [(row.line, row.values) for row in loaded.rows]


def test_split_files_follow_the_hubs_naming_convention() -> None:
    names = [
        "README.md",
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
        "data/validation-00000-of-00001.parquet",
        "dev.jsonl",
        "test/part_1.csv",
        "training_notes.json",
    ]
    assert split_files(names, "train") == [
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
    ]
    assert split_files(names, "validation") == ["data/validation-00000-of-00001.parquet", "dev.jsonl"]
    assert split_files(names, "test") == ["test/part_1.csv"]
    assert split_files(["rows.jsonl", "more.csv", "LICENSE"], "train") == ["more.csv", "rows.jsonl"]
    assert split_files(["rows.jsonl"], "validation") == []


def test_a_split_is_read_by_name_file_after_file_with_the_datasets_token(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATASET_TOKEN_ENV["dataset.source"], "hf_dataset_token")
    rows = _load(tmp_path / "hub")
    assert rows == [
        (1, {"prompt": "你好", "completion": "您好！"}),
        (2, {"prompt": "hi", "completion": "hello"}),
        (3, {"prompt": "退货", "completion": "七天内可退"}),
    ]
    downloaded = {request.path.rsplit("/", 1)[-1] for request in hub.requests if "/resolve/" in request.path}
    assert downloaded == {"train-00000-of-00002.jsonl", "train-00001-of-00002.parquet"}
    assert {request.authorization for request in hub.requests} == {"Bearer hf_dataset_token"}
    assert (tmp_path / "hub" / "datasets--org--chats" / "snapshots" / MAIN / "data").is_dir()


def test_the_cache_serves_a_retry_offline(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _load(tmp_path / "hub", split="validation")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.requests.clear()
    assert (
        _load(tmp_path / "hub", split="validation")
        == first
        == [(1, {"prompt": "bye", "completion": "goodbye"})]
    )
    assert hub.requests == []


def test_a_revision_pins_the_files_read_and_the_commit_is_reported(hub: FakeHub, tmp_path: Path) -> None:
    loaded = load_rows(_source(revision="v1"), None, "auto", where="dataset.source", hub_cache=str(tmp_path))
    assert [row.values for row in loaded.rows] == [{"prompt": "old", "completion": "row"}]
    assert (loaded.source, loaded.commit) == ("dataset.source.hub", V1)


def test_globs_choose_files_instead_of_the_split(hub: FakeHub, tmp_path: Path) -> None:
    rows = _load(tmp_path, files=["data/*.parquet", "data/test-*"])
    assert [values["prompt"] for _, values in rows] == ["thanks", "退货"]


def test_a_malformed_row_is_reported_by_its_file_and_line(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos["org/chats"].revisions["main"][1]["data/train-00000-of-00002.jsonl"] += b'{"prompt": \n'
    loaded = load_rows(_source(), None, "auto", where="dataset.source", hub_cache=str(tmp_path))
    assert [(row.source, row.line) for row in loaded.bad] == [
        ("dataset.source.hub (data/train-00000-of-00002.jsonl)", 3)
    ]


def test_the_pipeline_records_each_hub_sources_commit(hub: FakeHub, tmp_path: Path) -> None:
    spec = DatasetSpec.model_validate(
        {
            "source": {"hub": {"name": "org/chats"}},
            "validation": {"source": {"hub": {"name": "org/chats", "split": "validation"}}},
            "cleaning": {"minChars": 1},
        }
    )
    prepared = prepare_dataset(
        spec, TrainerPaths(output_dir=str(tmp_path), hf_home=str(tmp_path / "hf")), seed=0
    )
    assert (prepared.report.train_rows, prepared.report.validation_rows) == (3, 1)
    assert data_report(prepared)["hubCommits"] == {"dataset.source": MAIN, "dataset.validation.source": MAIN}
    assert set(prepared.digests) == {"dataset.source", "dataset.validation.source"}
    assert prepared.digests["dataset.source"] != prepared.digests["dataset.validation.source"]
    assert (tmp_path / "hf" / "hub" / "datasets--org--chats").is_dir()


@pytest.mark.parametrize(
    ("hub_spec", "reason", "message"),
    [
        (
            {"name": "org/missing"},
            "DatasetNotFound",
            r"^dataset.source.hub.name: no dataset org/missing on the Hub at http://127\.0\.0\.1:\d+, "
            r"or it is private: check the name, or set dataset.source.hub.tokenSecretRef",
        ),
        (
            {"name": "org/gated"},
            "DatasetNotFound",
            r"^dataset.source.hub: org/gated is gated; accept its terms on the Hub with the account "
            r"whose token dataset.source.hub.tokenSecretRef names",
        ),
        (
            {"name": "org/chats", "revision": "v9"},
            "DatasetNotFound",
            r"^dataset.source.hub.revision: org/chats has no branch, tag or commit 'v9'",
        ),
        (
            {"name": "org/chats", "split": "holdout"},
            "DatasetNotFound",
            r"^dataset.source.hub.split: no file of org/chats@main belongs to split 'holdout'; "
            r"its data files are data/test-00000-of-00001.jsonl, data/train-00000-of-00002.jsonl, ",
        ),
        (
            {"name": "org/chats", "files": ["README.md"]},
            "UnsupportedFormat",
            r"^dataset.source.hub.files: README.md of org/chats is not jsonl, json, csv or parquet",
        ),
    ],
    ids=["missing", "gated", "revision", "split", "not-data"],
)
def test_what_cannot_be_read_names_the_field_to_fix(
    hub: FakeHub, tmp_path: Path, hub_spec: dict[str, object], reason: str, message: str
) -> None:
    source = DataSource.model_validate({"hub": hub_spec})
    with pytest.raises(TrainerInputError, match=message) as raised:
        load_rows(source, None, "auto", where="dataset.source", hub_cache=str(tmp_path))
    assert raised.value.reason == reason


def test_an_unreachable_hub_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as closed:  # a loopback port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(
        TrainerInputError,
        match=rf"^dataset.validation.source.hub: could not reach the Hub at http://127.0.0.1:{port} for "
        r"org/chats@main \(ConnectError: .*\); check the cluster's egress",
    ) as raised:
        load_rows(_source(), None, "auto", where="dataset.validation.source", hub_cache=str(tmp_path))
    assert raised.value.reason == "DatasetUnreachable"


def test_offline_without_a_cached_copy_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        TrainerInputError,
        match=r"^dataset.source.hub: org/chats@main is not in the cache and HF_HUB_OFFLINE forbids "
        r"downloading it; unset HF_HUB_OFFLINE, or put the files on a PVC",
    ):
        load_rows(_source(), None, "auto", where="dataset.source", hub_cache=str(tmp_path))
