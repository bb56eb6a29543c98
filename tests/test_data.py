"""Tests of the prepare_data stage: real chat data, the built-in tasks and bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spinflow.config import DataParams
from spinflow.data import (
    SPLITS,
    load_split,
    looks_like_hub_id,
    prepare_data,
    read_records,
)
from spinflow.errors import DataError

RECORD_KEYS = {"id", "prompt", "answer", "task", "verifier"}


# --------------------------------------------------------------------------------------------
# Fixture files in the UltraChat-200k layout: prompt, prompt_id, messages (multi-turn)


def ultrachat_rows(n: int, *, start: int = 0) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        prompt = f"Question number {i}: what is {i} plus {i}?"
        rows.append(
            {
                "prompt": prompt,
                "prompt_id": f"pid{i:04d}",
                "messages": [
                    {"role": "user", "content": f"  {prompt}\n"},
                    {"role": "assistant", "content": f" It is {2 * i}. "},
                    {"role": "user", "content": "And times two?"},
                    {"role": "assistant", "content": f"It is {4 * i}."},
                ],
            }
        )
    return rows


def write_jsonl_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet_file(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_csv_file(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def columns_rows(n: int) -> list[dict]:
    return [{"prompt": f"Prompt {i}?", "response": f"Answer {i}."} for i in range(n)]


def params_for(source: Path | str, **changes) -> DataParams:
    # the pool disjoint and no validation split: every split is its own slice of the data
    values = {"source": str(source), "num_sft": 4, "num_pool": 3, "num_test": 3, "seed": 7}
    values.update(num_val=0, pool="disjoint")
    values.update(changes)
    return DataParams(**values)


def split_prompts(out_dir: Path) -> dict[str, list[str]]:
    return {split: [r["prompt"] for r in load_split(out_dir, split)] for split in SPLITS}


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def assert_disjoint(prompts: dict[str, list[str]]) -> None:
    everything = [p for split in SPLITS for p in prompts[split]]
    assert len(everything) == len(set(everything))


# --------------------------------------------------------------------------------------------
# Reading real data


def test_jsonl_messages_keep_first_user_and_assistant_turn(tmp_path):
    path = write_jsonl_file(tmp_path / "chat.jsonl", ultrachat_rows(3))
    records, duplicates = read_records(path)
    assert duplicates == 0
    assert records[1] == {
        "id": "pid0001",
        "prompt": "Question number 1: what is 1 plus 1?",
        "answer": "It is 2.",
        "task": "external",
        "verifier": None,
    }
    assert [r["id"] for r in records] == ["pid0000", "pid0001", "pid0002"]


def test_system_message_first_is_skipped(tmp_path):
    row = {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a colour."},
            {"role": "user", "content": "Any colour."},
            {"role": "assistant", "content": "Blue."},
        ]
    }
    path = write_jsonl_file(tmp_path / "chat.jsonl", [row])
    records, _ = read_records(path, fmt="messages")
    assert records == [
        {
            "id": "row-0",
            "prompt": "Name a colour.",
            "answer": "Blue.",
            "task": "external",
            "verifier": None,
        }
    ]


def test_parquet_reads_like_jsonl(tmp_path):
    rows = ultrachat_rows(5)
    from_jsonl = read_records(write_jsonl_file(tmp_path / "chat.jsonl", rows))
    from_parquet = read_records(write_parquet_file(tmp_path / "chat.parquet", rows))
    assert from_parquet == from_jsonl


def test_csv_prompt_response_columns(tmp_path):
    rows = [{"prompt": " Say hi. ", "response": "Hi!"}, {"prompt": "Say bye.", "response": "Bye!"}]
    records, duplicates = read_records(write_csv_file(tmp_path / "pairs.csv", rows))
    assert duplicates == 0
    assert [(r["id"], r["prompt"], r["answer"]) for r in records] == [
        ("row-0", "Say hi.", "Hi!"),
        ("row-1", "Say bye.", "Bye!"),
    ]


def test_csv_with_custom_columns_and_messages_as_json_text(tmp_path):
    rows = [{"question": "Q1", "reply": "A1"}, {"question": "Q2", "reply": "A2"}]
    path = write_csv_file(tmp_path / "custom.csv", rows)
    records, _ = read_records(
        path, fmt="columns", prompt_column="question", response_column="reply"
    )
    assert [(r["prompt"], r["answer"]) for r in records] == [("Q1", "A1"), ("Q2", "A2")]

    chat = [{"prompt_id": "x", "messages": json.dumps(ultrachat_rows(1)[0]["messages"])}]
    records, _ = read_records(write_csv_file(tmp_path / "chat.csv", chat))
    assert records[0]["id"] == "x"
    assert records[0]["answer"] == "It is 0."


def test_duplicates_dropped_keep_first_and_are_reported(tmp_path, caplog):
    rows = ultrachat_rows(12)
    again = dict(rows[2], prompt_id="other")
    again["messages"] = [
        {"role": "user", "content": rows[2]["prompt"]},
        {"role": "assistant", "content": "x"},
    ]
    path = write_jsonl_file(tmp_path / "chat.jsonl", rows + [again, rows[5]])
    records, duplicates = read_records(path)
    assert duplicates == 2
    assert len(records) == 12
    assert next(r for r in records if r["prompt"] == rows[2]["prompt"])["id"] == "pid0002"

    with caplog.at_level(logging.INFO, logger="spinflow.data"):
        summary = prepare_data(params_for(path), tmp_path / "out")
    assert summary["duplicates_dropped"] == 2
    assert summary["rows_read"] == 14
    assert summary["unique_examples"] == 12
    assert "2 duplicate" in caplog.text
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk == summary


def test_duplicate_prompt_ids_are_made_unique(tmp_path):
    rows = [{"prompt_id": "same", "prompt": f"P{i}", "response": "A"} for i in range(3)]
    records, _ = read_records(write_jsonl_file(tmp_path / "ids.jsonl", rows))
    assert len({r["id"] for r in records}) == 3


# --------------------------------------------------------------------------------------------
# Sampling real data into splits


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_prepare_real_data_is_deterministic_and_disjoint(tmp_path, suffix):
    rows = ultrachat_rows(30)
    writer = write_jsonl_file if suffix == "jsonl" else write_parquet_file
    path = writer(tmp_path / f"chat.{suffix}", rows)
    params = params_for(path, num_sft=8, num_pool=5, num_test=4)

    summary = prepare_data(params, tmp_path / "a")
    prepare_data(params, tmp_path / "b")
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "pool.jsonl",
        "sft.jsonl",
        "summary.json",
        "test.jsonl",
        "val.jsonl",
    ]
    assert summary["counts"] == {"sft": 8, "val": 0, "pool": 5, "test": 4}
    assert summary["format"] == "messages"
    assert summary["task_counts"]["pool"] == {"external": 5}

    prompts = split_prompts(tmp_path / "a")
    assert_disjoint(prompts)
    for split in SPLITS:
        for record in load_split(tmp_path / "a", split):
            assert set(record) == RECORD_KEYS
            assert record["task"] == "external" and record["verifier"] is None

    prepare_data(params_for(path, num_sft=8, num_pool=5, num_test=4, seed=8), tmp_path / "c")
    assert split_prompts(tmp_path / "c") != prompts


def test_num_sft_zero_gives_empty_sft_split(tmp_path):
    path = write_jsonl_file(tmp_path / "chat.jsonl", ultrachat_rows(5))
    summary = prepare_data(params_for(path, num_sft=0, num_pool=2, num_test=2), tmp_path / "out")
    assert summary["counts"] == {"sft": 0, "val": 0, "pool": 2, "test": 2}
    assert (tmp_path / "out" / "sft.jsonl").read_bytes() == b""
    assert load_split(tmp_path / "out", "sft") == []


def test_too_few_unique_examples(tmp_path):
    rows = ultrachat_rows(6)
    path = write_jsonl_file(tmp_path / "chat.jsonl", rows + rows[:2])
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        prepare_data(params_for(path, num_sft=4, num_pool=2, num_test=2), out)
    message = str(info.value)
    assert "6 unique examples" in message
    assert "2 duplicate" in message
    assert "4 + 2 + 2 = 8" in message
    for key in ("data.num_sft", "data.num_pool", "data.num_test", "lower"):
        assert key in message
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# Bad input: one line naming file, place and problem; nothing that looks complete is left


def _line(n: int) -> str:
    row = ultrachat_rows(1, start=n)[0]
    return json.dumps(row) + "\n"


def _good_lines(n: int) -> str:
    return "".join(_line(i) for i in range(n))


def _messages_line(messages) -> str:
    return json.dumps({"prompt_id": "bad", "messages": messages}) + "\n"


JSONL_CASES = {
    "invalid_json": (
        _good_lines(2) + '{"prompt": "x", \n',
        {},
        ["line 3", "invalid JSON", "at character 17"],
    ),
    "not_object": (_good_lines(1) + "[1, 2]\n", {}, ["line 2", "expected a JSON object", "array"]),
    "string_line": (_good_lines(1) + '"hello"\n', {}, ["line 2", "got a string"]),
    "blank_lines_count": (
        _good_lines(1) + "\n\n" + "{oops}\n",
        {},
        ["line 4", "invalid JSON"],
    ),
    "missing_response_column": (
        '{"prompt": "a", "response": "b"}\n{"prompt": "c", "answer": "d"}\n',
        {"format": "columns"},
        ["line 2", "'response'", "data.response_column", "columns found: answer, prompt"],
    ),
    "missing_columns_auto": (
        '{"question": "a", "reply": "b"}\n',
        {},
        ["line 1", "'messages'", "data.messages_column", "data.prompt_column", "question, reply"],
    ),
    "missing_messages_column": (
        _good_lines(1) + '{"prompt": "a", "prompt_id": "z"}\n',
        {},
        ["line 2", "'messages'", "data.messages_column", "columns found: prompt, prompt_id"],
    ),
    "messages_not_list": (
        _good_lines(1) + _messages_line({"role": "user", "content": "hi"}),
        {},
        ["line 2", "must be a list", "dict"],
    ),
    "message_not_object": (
        _good_lines(1) + _messages_line(["hi", "there"]),
        {},
        ["line 2", "message 1", "role and content"],
    ),
    "no_user_turn": (
        _good_lines(2) + _messages_line([{"role": "system", "content": "s"}]),
        {},
        ["line 3", "no user turn"],
    ),
    "no_assistant_after_user": (
        _good_lines(1)
        + _messages_line(
            [{"role": "assistant", "content": "early"}, {"role": "user", "content": "hi"}]
        ),
        {},
        ["line 2", "no assistant turn after the first user turn"],
    ),
    "empty_prompt": (
        _good_lines(1)
        + _messages_line(
            [{"role": "user", "content": "   "}, {"role": "assistant", "content": "a"}]
        ),
        {},
        ["line 2", "empty prompt"],
    ),
    "empty_answer": (
        _good_lines(1)
        + _messages_line([{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]),
        {},
        ["line 2", "empty answer"],
    ),
    "empty_answer_column": (
        '{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": " "}\n',
        {},
        ["line 2", "empty answer", "'response'"],
    ),
    "answer_not_text": (
        '{"prompt": "a", "response": ["b"]}\n',
        {},
        ["line 1", "'response'", "list", "expected text"],
    ),
    "empty_file": ("", {}, ["empty file"]),
    "only_blank_lines": ("\n  \n\n", {}, ["no rows"]),
}


def _assert_clean_failure(tmp_path: Path, params: DataParams, expected: list[str], file: str):
    """Fail into a fresh out dir and into one left by an earlier good run."""
    fresh = tmp_path / "fresh_out"
    with pytest.raises(DataError) as info:
        prepare_data(params, fresh)
    message = str(info.value)
    assert "\n" not in message
    assert file in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    error = info.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    assert not fresh.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    previous = tmp_path / "previous_out"
    good = write_jsonl_file(tmp_path / "good_source.jsonl", ultrachat_rows(20))
    prepare_data(params_for(good), previous)
    before = snapshot(previous)
    with pytest.raises(DataError):
        prepare_data(params, previous)
    assert snapshot(previous) == before
    return message


@pytest.mark.parametrize("case", sorted(JSONL_CASES))
def test_bad_jsonl(tmp_path, case):
    text, changes, expected = JSONL_CASES[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(text, encoding="utf-8")
    _assert_clean_failure(tmp_path, params_for(path, **changes), expected, str(path))


def test_non_utf8_jsonl_names_line_and_byte_offset(tmp_path):
    first = _line(0).encode()
    second = b'{"prompt": "caf\xe9", "response": "x"}\n'
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(first + second)
    offset = len(first) + second.index(b"\xe9")
    message = _assert_clean_failure(
        tmp_path, params_for(path), ["line 2", f"byte offset {offset}", "UTF-8", "0xe9"], str(path)
    )
    column = second.index(b"\xe9") + 1
    assert f"column {column} of the line" in message


@pytest.mark.parametrize("indent", [None, 2])
def test_json_array_file_gets_a_hint(tmp_path, indent):
    path = tmp_path / "array.json"
    path.write_text(json.dumps(ultrachat_rows(2), indent=indent), encoding="utf-8")
    with pytest.raises(DataError, match="line 1: .*one JSON object per line"):
        read_records(path)


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _good_lines(2).encode())
    records, _ = read_records(path)
    assert len(records) == 2


def _parquet(rows: list[dict]):
    def write(path: Path) -> None:
        pq.write_table(pa.Table.from_pylist(rows), path)

    return write


def _bytes(data: bytes):
    def write(path: Path) -> None:
        path.write_bytes(data)

    return write


def _empty_parquet(path: Path) -> None:
    schema = pa.schema([("prompt", pa.string()), ("response", pa.string())])
    pq.write_table(schema.empty_table(), path)


def _csv_text(text: str):
    def write(path: Path) -> None:
        path.write_text(text, encoding="utf-8")

    return write


TABLE_CASES = {
    "parquet_missing_column": (
        "parquet",
        _parquet([{"prompt": "a", "answer": "b"}]),
        {"format": "columns"},
        ["no column 'response'", "data.response_column", "columns found: answer, prompt"],
    ),
    "parquet_empty_answer": (
        "parquet",
        _parquet(columns_rows(3) + [{"prompt": "p", "response": None}]),
        {},
        ["row 4", "empty answer"],
    ),
    "parquet_no_assistant": (
        "parquet",
        _parquet(
            ultrachat_rows(2)
            + [
                {
                    "prompt": "x",
                    "prompt_id": "y",
                    "messages": [{"role": "user", "content": "x"}],
                }
            ]
        ),
        {},
        ["row 3", "no assistant turn"],
    ),
    "parquet_corrupt": ("parquet", _bytes(b"this is not parquet at all"), {}, ["Parquet"]),
    "parquet_no_rows": ("parquet", _empty_parquet, {}, ["no rows"]),
    "csv_empty_file": ("csv", _bytes(b""), {}, ["empty file"]),
    "csv_header_only": ("csv", _csv_text("prompt,response\n"), {}, ["no rows"]),
    "csv_missing_column": (
        "csv",
        _csv_text("prompt,reply\na,b\n"),
        {},
        ["no column 'response'", "data.response_column", "columns found: prompt, reply"],
    ),
    "csv_empty_prompt": (
        "csv",
        _csv_text("prompt,response\na,b\nc,d\n,e\n"),
        {},
        ["row 3", "empty prompt"],
    ),
    "csv_malformed": (
        "csv",
        _csv_text('prompt,response\na,b\nc,d,e,f\n"g,h\n'),
        {},
        ["cannot read as CSV", "line 3"],
    ),
    "csv_non_utf8": (
        "csv",
        _bytes(b"prompt,response\nok,fine\nna\xefve,x\n"),
        {},
        ["line 3", "byte offset 26", "UTF-8"],
    ),
    "csv_bad_messages_text": (
        "csv",
        _csv_text('messages\n"not json"\n'),
        {},
        ["row 1", "not a JSON list of messages"],
    ),
}


@pytest.mark.parametrize("case", sorted(TABLE_CASES))
def test_bad_parquet_and_csv(tmp_path, case):
    suffix, write, changes, expected = TABLE_CASES[case]
    path = tmp_path / f"bad.{suffix}"
    write(path)
    _assert_clean_failure(tmp_path, params_for(path, **changes), expected, str(path))


@pytest.mark.parametrize("source", ["missing.jsonl", "nowhere/data.parquet", "a/b/c", "./x/y"])
def test_missing_local_file(tmp_path, source):
    path = tmp_path / source if not source.startswith("./") else source
    message = _assert_clean_failure(tmp_path, params_for(path), ["file not found"], str(path))
    assert message == f"{path}: file not found"


def test_unsupported_suffix_and_directory(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        read_records(text)
    with pytest.raises(DataError, match="is a directory"):
        read_records(tmp_path)


def test_unknown_format_is_an_error(tmp_path):
    path = write_jsonl_file(tmp_path / "chat.jsonl", ultrachat_rows(1))
    with pytest.raises(DataError, match="unknown data.format"):
        read_records(path, fmt="sharegpt")


# --------------------------------------------------------------------------------------------
# The built-in verifiable tasks


def test_builtin_counts_disjoint_deterministic(tmp_path):
    params = DataParams(
        source="builtin", num_sft=40, num_pool=20, num_test=20, seed=3, num_val=0, pool="disjoint"
    )
    summary = prepare_data(params, tmp_path / "a")
    first = snapshot(tmp_path / "a")
    again = prepare_data(params, tmp_path / "a")
    assert snapshot(tmp_path / "a") == first
    assert again == summary
    prepare_data(params, tmp_path / "b")
    assert snapshot(tmp_path / "b") == first

    assert summary["counts"] == {"sft": 40, "val": 0, "pool": 20, "test": 20}
    assert summary["source"] == "builtin"
    assert summary["duplicates_dropped"] == 0
    for split in SPLITS:
        assert sum(summary["task_counts"][split].values()) == summary["counts"][split]
        if split != "val":  # empty here
            assert len(summary["task_counts"][split]) > 1, "every split mixes task families"

    prompts = split_prompts(tmp_path / "a")
    assert_disjoint(prompts)
    for split in SPLITS:
        for record in load_split(tmp_path / "a", split):
            assert set(record) == RECORD_KEYS
            assert isinstance(record["verifier"], dict) and "name" in record["verifier"]
            assert record["task"] != "external"

    other = DataParams(
        source="builtin", num_sft=40, num_pool=20, num_test=20, seed=4, num_val=0, pool="disjoint"
    )
    prepare_data(other, tmp_path / "c")
    assert split_prompts(tmp_path / "c") != prompts


def test_builtin_families_subset(tmp_path):
    params = DataParams(
        families=["addition", "reverse_word"], num_sft=6, num_pool=4, num_test=4, pool="disjoint"
    )
    summary = prepare_data(params, tmp_path / "out")
    tasks = {task for split in SPLITS for task in summary["task_counts"][split]}
    assert tasks == {"addition", "reverse_word"}
    assert summary["families"] == ["addition", "reverse_word"]


def test_builtin_unknown_family(tmp_path):
    with pytest.raises(DataError, match="unknown task family 'nope'.*data.families"):
        prepare_data(DataParams(families=["nope"]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# Hugging Face Hub datasets (load_dataset replaced: no network in tests)


def test_hub_dataset(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split=None, **kwargs):
        calls.append((name, split))
        return datasets.Dataset.from_list(ultrachat_rows(25))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    params = DataParams(
        source="HuggingFaceH4/ultrachat_200k",
        num_sft=10,
        num_pool=5,
        num_test=5,
        seed=1,
        num_val=0,
        pool="disjoint",
    )
    summary = prepare_data(params, tmp_path / "out")
    assert calls == [("HuggingFaceH4/ultrachat_200k", "train_sft")]
    assert summary["counts"] == {"sft": 10, "val": 0, "pool": 5, "test": 5}
    assert summary["hub_split"] == "train_sft"
    assert summary["format"] == "messages"
    assert summary["rows_read"] == 25
    pool = load_split(tmp_path / "out", "pool")
    assert all(r["id"].startswith("pid") and r["answer"].startswith("It is") for r in pool)
    assert_disjoint(split_prompts(tmp_path / "out"))

    expected = {split: load_split(tmp_path / "out", split) for split in SPLITS}
    write_jsonl_file(tmp_path / "same.jsonl", ultrachat_rows(25))
    prepare_data(params.model_copy(update={"source": "same.jsonl"}), tmp_path / "local")
    assert {split: load_split(tmp_path / "local", split) for split in SPLITS} == expected


def test_hub_dataset_bad_row_names_row(tmp_path, monkeypatch):
    import datasets

    rows = columns_rows(4)
    rows[2]["response"] = ""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        datasets, "load_dataset", lambda name, split=None: datasets.Dataset.from_list(rows)
    )
    with pytest.raises(DataError) as info:
        read_records("org/pairs", hub_split="train")
    assert str(info.value) == "org/pairs (split 'train'): row 3: empty answer (column 'response')"


def test_hub_network_failure(tmp_path, monkeypatch):
    import datasets

    def offline(name, split=None, **kwargs):
        raise ConnectionError("Couldn't reach 'HuggingFaceH4/ultrachat_200k' on the Hub")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        prepare_data(DataParams(source="HuggingFaceH4/ultrachat_200k"), out)
    message = str(info.value)
    assert message.startswith("HuggingFaceH4/ultrachat_200k: could not download")
    assert "ConnectionError" in message
    assert "local .jsonl" in message and "offline" in message
    assert "\n" not in message
    assert not out.exists()


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("HuggingFaceH4/ultrachat_200k", True),
        ("org/name-v1.2", True),
        ("data/chat.jsonl", False),
        ("data/chat.parquet", False),
        ("a/b/c", False),
        ("./org/name", False),
        ("/abs/path", False),
        ("chat", False),
        ("builtin", False),
    ],
)
def test_looks_like_hub_id(source, expected):
    assert looks_like_hub_id(source) is expected


# --------------------------------------------------------------------------------------------
# Reading prepared splits


def test_load_split_errors(tmp_path):
    with pytest.raises(DataError) as info:
        load_split(tmp_path / "data", "pool")
    message = str(info.value)
    assert str(tmp_path / "data" / "pool.jsonl") in message
    assert "dvc repro prepare_data" in message
    with pytest.raises(DataError, match="unknown split 'train'"):
        load_split(tmp_path, "train")
    (tmp_path / "test.jsonl").write_text('{"prompt": "a", "answer": "b"}\n{broken\n')
    with pytest.raises(DataError, match="line 2"):
        load_split(tmp_path, "test")


# --------------------------------------------------------------------------------------------
# Numbers where text is expected: refused, not silently stringified


@pytest.mark.parametrize(
    ("values", "kind"),
    [([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "int64"), ([0.5 * i for i in range(10)], "double")],
)
def test_a_numeric_parquet_column_is_refused_naming_its_type(tmp_path, values, kind):
    rows = [{"prompt": f"Prompt {i}?", "response": v} for i, v in enumerate(values)]
    path = write_parquet_file(tmp_path / "numbers.parquet", rows)
    message = _assert_clean_failure(
        tmp_path, params_for(path), ["column 'response'", f"numeric Parquet type {kind}"], str(path)
    )
    assert message == (
        f"{path}: column 'response' has the numeric Parquet type {kind}, expected text; convert "
        "it to strings first (pandas: df['response'] = df['response'].astype(str))"
    )


def test_a_json_number_where_text_is_expected_names_the_line(tmp_path):
    rows = columns_rows(10)
    rows[4]["response"] = 3.0  # would have become "3.0"
    path = write_jsonl_file(tmp_path / "numbers.jsonl", rows)
    message = _assert_clean_failure(tmp_path, params_for(path), ["line 5"], str(path))
    assert message == (
        f"{path}: line 5: column 'response' holds the number 3.0, expected text; store prompts "
        'and answers as strings (in JSON: "42", not 42)'
    )


def test_numbers_as_strings_are_fine(tmp_path):
    rows = [{"prompt": f"What is {i} + {i}?", "response": str(2 * i)} for i in range(10)]
    path = write_parquet_file(tmp_path / "sums.parquet", rows)
    assert prepare_data(params_for(path), tmp_path / "out")["unique_examples"] == 10
    for record in load_split(tmp_path / "out", "sft"):
        i = int(record["prompt"].split()[2])
        assert record["answer"] == str(2 * i)


# --------------------------------------------------------------------------------------------
# A missing local path shaped like org/name


def test_a_missing_path_under_a_local_folder_is_not_a_hub_id(tmp_path, monkeypatch):
    import datasets

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub must not be asked")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    assert looks_like_hub_id("data/chat") is False  # data/ is here: a local path
    assert looks_like_hub_id("HuggingFaceH4/ultrachat_200k") is True  # no such folder here
    with pytest.raises(DataError) as info:
        read_records("data/chat")
    assert str(info.value) == (
        "data/chat: file not found (read as a local path, not a Hub dataset id, because data/ "
        "exists here)"
    )


def test_pool_drawn_from_sft_and_a_validation_split(tmp_path):
    """data.pool: sft (the paper's design): the pool is a sample of the SFT split; the
    validation and test splits share no prompt with it or with each other."""
    params = DataParams(source="builtin", num_sft=12, num_val=4, num_pool=5, num_test=6, seed=3)
    summary = prepare_data(params, tmp_path / "out")
    assert summary["counts"] == {"sft": 12, "val": 4, "pool": 5, "test": 6}
    assert summary["pool"] == "sft"
    prompts = split_prompts(tmp_path / "out")
    assert set(prompts["pool"]) <= set(prompts["sft"])
    assert_disjoint({**prompts, "pool": []})
    # the pool is part of the SFT data, not new data: it draws nothing of its own
    disjoint = prepare_data(params.model_copy(update={"pool": "disjoint"}), tmp_path / "d")
    assert disjoint["pool"] == "disjoint"
    assert_disjoint(split_prompts(tmp_path / "d"))


def test_a_pool_larger_than_the_sft_split_is_refused():
    with pytest.raises(ValueError, match=r"data.num_pool \(9\) is larger than data.num_sft \(8\)"):
        DataParams(num_sft=8, num_pool=9)
    DataParams(num_sft=8, num_pool=9, pool="disjoint")
