"""Reading sources: every format, encodings, malformed rows, empty files and URLs."""

from __future__ import annotations

import codecs
import functools
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from deeptune.api.finetunejob import DataSource
from deeptune_trainer.data import formats
from deeptune_trainer.data.download import download
from deeptune_trainer.data.loading import load_rows
from deeptune_trainer.data.rows import BadRow, check_bad_row_ratio
from deeptune_trainer.errors import TrainerInputError

PVC = DataSource.model_validate({"pvc": {"claimName": "data", "path": "train.jsonl"}})


def _load(path: Path, fmt: str = "auto") -> list[tuple[int, dict[str, object]]]:
    loaded = load_rows(PVC, str(path), fmt, where="dataset.source")  # type: ignore[arg-type]
    assert not loaded.bad
    return [(row.line, row.values) for row in loaded.rows]


def test_jsonl_rows_keep_their_line_numbers_and_blank_lines_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "你好", "completion": "您好！"}\n\n{"prompt": "hi", "completion": "hello"}\n')
    assert _load(path) == [
        (1, {"prompt": "你好", "completion": "您好！"}),
        (3, {"prompt": "hi", "completion": "hello"}),
    ]


def test_jsonl_bad_lines_are_counted_with_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(
        '{"prompt": "a", "completion": "b"}\n{"prompt": "a" "completion": "b"}\n[1, 2]\n{"p": 1}\n'
    )
    loaded = load_rows(PVC, str(path), "auto", where="dataset.source")
    assert [row.line for row in loaded.rows] == [1, 4]
    assert [row.describe() for row in loaded.bad] == [
        "line 2: invalid JSON: Expecting ',' delimiter at column 16",
        "line 3: expected a JSON object, found an array",
    ]
    assert loaded.read == 4
    assert loaded.source == "dataset.source.pvc"


JSON_LINES = [
    '{"a": 1}', ' {"a": 1}', '{"a": 1} ', '{"a": 1}\r', '{"a": 1}\t\r', '{"a": 1} x', '{"a": 1}{"b": 2}',
    '{"a": NaN}', '{"a": 123456789012345678901234567890}', '{"a": "\\ud800"}', '[1, 2]', '"s"', '1 2',
    '{"a": 1}\u3000', '{"a": 1}\x0c', '{"a" 1}', "", "{", '{"a": {"b": [1, {"c": null}]}}',
]  # fmt: skip


@pytest.mark.parametrize("line", JSON_LINES)
def test_a_json_line_reads_as_json_loads_reads_it(line: str) -> None:
    # The reader tries raw_decode first (half the time); what it reads, and how it words a failure,
    # must be json.loads' own.
    try:
        expected: object = json.loads(line)
    except json.JSONDecodeError as error:
        with pytest.raises(json.JSONDecodeError) as raised:
            formats._json_value(line)
        assert (raised.value.msg, raised.value.colno) == (error.msg, error.colno)
        return
    assert json.dumps(formats._json_value(line)) == json.dumps(expected)  # NaN, which is not equal to itself


def test_rows_share_their_column_names(tmp_path: Path) -> None:
    # A row holds its cells; rows with the same columns share one tuple of names, so a million rows
    # do not hold a million dicts and a million copies of each name.
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    rows.append({"completion": "e", "x": 1})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    first, second, third = load_rows(PVC, str(path), "auto", where="dataset.source").rows
    assert first.columns is second.columns and second.cells == ("c", "d")
    assert third.values == {"completion": "e", "x": 1}
    assert (third.get("x"), third.get("prompt"), third.has("prompt")) == (1, None, False)


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a\u2028b", "completion": "c"}\n', encoding="utf-8")
    assert _load(path) == [(1, {"prompt": "a\u2028b", "completion": "c"})]


def test_utf8_bom_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_bytes(codecs.BOM_UTF8 + "prompt,completion\n你好,您好\n".encode())
    assert _load(path) == [(2, {"prompt": "你好", "completion": "您好"})]


def test_utf16_with_bom_is_read(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_bytes("prompt,completion\n问,答\n".encode("utf-16"))
    assert _load(path) == [(2, {"prompt": "问", "completion": "答"})]


def test_gbk_file_gets_a_message_that_says_how_to_fix_it(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_bytes("prompt,completion\n你好,您好\n".encode("gbk"))
    with pytest.raises(TrainerInputError) as raised:
        _load(path)
    assert raised.value.reason == "InvalidDataset"
    assert raised.value.message == (
        "dataset.source.pvc: 'train.csv' is not UTF-8 text (byte 0xc4 on line 2). It decodes as "
        "GB18030/GBK, common for Chinese files saved by Excel. Save it as UTF-8, e.g. "
        "`iconv -f GB18030 -t UTF-8 in.csv > out.csv`."
    )


def test_csv_with_embedded_newlines_quotes_and_commas(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text(
        'prompt,completion\n"第一行\n第二行","He said ""hi"", then left"\nplain,"a, b"\n', encoding="utf-8"
    )
    assert _load(path) == [
        (2, {"prompt": "第一行\n第二行", "completion": 'He said "hi", then left'}),
        (4, {"prompt": "plain", "completion": "a, b"}),
    ]


def test_csv_row_with_wrong_field_count_is_bad(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("prompt,completion\na,b\na,b,c\n\nd,e\n")
    loaded = load_rows(PVC, str(path), "csv", where="dataset.source")
    assert [row.line for row in loaded.rows] == [2, 5]
    assert loaded.bad == [
        BadRow(
            "dataset.source.pvc",
            3,
            "has 3 fields but the header has 2 (check the quoting of commas, quotes and newlines)",
        )
    ]


def test_csv_duplicate_header_fails(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("prompt,prompt\na,b\n")
    with pytest.raises(TrainerInputError, match=r"names these columns more than once: prompt$"):
        _load(path)


def test_json_array_and_wrapped_array(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"q": "1+1?", "a": "2"}, "oops"]))
    loaded = load_rows(PVC, str(path), "auto", where="dataset.source")
    assert [row.values for row in loaded.rows] == [{"q": "1+1?", "a": "2"}]
    assert [row.describe() for row in loaded.bad] == ["record 2: expected a JSON object, found a string"]
    path.write_text(json.dumps({"version": 1, "data": [{"q": "x"}]}))
    assert _load(path) == [(1, {"q": "x"})]


def test_json_lines_saved_as_json_are_read_as_lines(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text('{"q": "a"}\n{"q": "b"}\n')
    assert _load(path) == [(1, {"q": "a"}), (2, {"q": "b"})]


def test_broken_json_array_fails_with_position(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text('[{"q": "a"},\n {"q": }]')
    with pytest.raises(TrainerInputError) as raised:
        _load(path)
    assert raised.value.message.startswith(
        "dataset.source.pvc: not valid JSON (Expecting value at line 2, column 8); a .json file must hold"
    )


def test_parquet_with_nested_messages(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow", exc_type=ImportError)
    pq = pytest.importorskip("pyarrow.parquet", exc_type=ImportError)
    path = tmp_path / "train.parquet"
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "您好"}]
    pq.write_table(pa.Table.from_pylist([{"messages": messages}]), path)
    assert _load(path) == [(1, {"messages": messages})]


def test_parquet_is_read_a_batch_at_a_time_and_numbered_across_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pa = pytest.importorskip("pyarrow", exc_type=ImportError)
    pq = pytest.importorskip("pyarrow.parquet", exc_type=ImportError)
    monkeypatch.setattr(formats, "PARQUET_BATCH_ROWS", 2)
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": f"q{n}", "completion": "a"} for n in range(1, 6)]), path)
    assert [(line, values["prompt"]) for line, values in _load(path)] == [(n, f"q{n}") for n in range(1, 6)]


def test_not_a_parquet_file(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow.parquet", exc_type=ImportError)
    path = tmp_path / "train.parquet"
    path.write_text("not parquet")
    with pytest.raises(TrainerInputError, match=r"^dataset.source.pvc: not a readable Parquet file"):
        _load(path)


def test_inline_rows_are_numbered_by_record() -> None:
    source = DataSource.model_validate({"inline": [{"prompt": "p", "completion": "c"}]})
    loaded = load_rows(source, None, "auto", where="dataset.source")
    assert (loaded.source, loaded.unit, loaded.rows[0].line) == ("dataset.source.inline", "record", 1)


@pytest.mark.parametrize("content", ["", "  \n\n", "\ufeff"])
def test_empty_file_fails_clearly(tmp_path: Path, content: str) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TrainerInputError) as raised:
        _load(path)
    assert (raised.value.reason, raised.value.message) == (
        "EmptyDataset",
        "dataset.source.pvc: 'train.jsonl' is empty; it must hold at least one row",
    )


def test_csv_with_only_a_header_holds_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("prompt,completion\n")
    with pytest.raises(TrainerInputError, match=r"^dataset.source.pvc: the source holds no rows$"):
        _load(path)


def test_missing_file_and_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(TrainerInputError) as raised:
        _load(tmp_path / "nope.jsonl")
    assert raised.value.reason == "DatasetNotFound"
    assert raised.value.message == (
        f"dataset.source.pvc: {tmp_path / 'nope.jsonl'} does not exist; "
        "check the claim's path or the ConfigMap key"
    )
    path = tmp_path / "train.txt"
    path.write_text("{}")
    with pytest.raises(
        TrainerInputError, match=r"^dataset.format: cannot tell the format of dataset.source.pvc"
    ):
        _load(path)
    assert _load(path, "jsonl") == [(1, {})]


def test_bad_row_ratio_exceeded_names_the_rows() -> None:
    bad = [BadRow("dataset.source.pvc", line, "invalid JSON: Expecting value at column 1") for line in (2, 5)]
    check_bad_row_ratio("dataset.source.pvc", 40, bad, 0.05)
    with pytest.raises(TrainerInputError) as raised:
        check_bad_row_ratio("dataset.source.pvc", 20, bad, 0.05)
    assert raised.value.message == (
        "dataset.source.pvc: 2 of 20 rows are malformed (10.0%), more than dataset.maxBadRowRatio allows "
        "(5.0%); first: line 2: invalid JSON: Expecting value at column 1; line 5: invalid JSON: Expecting "
        "value at column 1. Fix these rows, or raise dataset.maxBadRowRatio to skip them."
    )


# --- URLs -------------------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A static file server on 127.0.0.1 serving a temporary directory."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_source_is_downloaded_and_format_told_by_its_name(http_root: tuple[Path, str]) -> None:
    root, base = http_root
    (root / "train.jsonl").write_text('{"prompt": "问", "completion": "答"}\n', encoding="utf-8")
    source = DataSource(url=f"{base}/train.jsonl?token=x")
    loaded = load_rows(source, None, "auto", where="dataset.source")
    assert [row.values for row in loaded.rows] == [{"prompt": "问", "completion": "答"}]
    assert loaded.source == "dataset.source.url"


def test_url_404_is_dataset_not_found(http_root: tuple[Path, str]) -> None:
    _, base = http_root
    with pytest.raises(TrainerInputError) as raised:
        load_rows(DataSource(url=f"{base}/missing.jsonl"), None, "auto", where="dataset.validation.source")
    assert raised.value.reason == "DatasetNotFound"
    assert raised.value.message == (
        f"dataset.validation.source.url: {base}/missing.jsonl answered HTTP 404 File not found; "
        "check the URL, and that it can be read without credentials"
    )


def test_url_that_never_answers_times_out(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/train.jsonl"
        with pytest.raises(TrainerInputError) as raised:
            download(url, tmp_path, where="dataset.source.url", timeout=0.2)
    assert raised.value.reason == "DatasetUnreachable"
    assert raised.value.message == f"dataset.source.url: could not download {url}: timed out after 0.2s"


def test_url_with_nothing_listening_is_unreachable(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(TrainerInputError, match=r"could not download http://127.0.0.1:\d+/x.csv: .*refused"):
        download(f"http://127.0.0.1:{port}/x.csv", tmp_path, where="dataset.source.url")
