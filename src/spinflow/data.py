"""The ``prepare_data`` stage: build the SFT, validation, pool and test splits.

Every split is a JSONL file of records ``{"id", "prompt", "answer", "task", "verifier"}``. The
splits come from one sample of unique prompts cut into consecutive slices, so no prompt is in two
splits, with one exception: with ``data.pool: sft`` (the default, as in the SPIN paper) the pool
is the first ``data.num_pool`` examples of the SFT split. The validation split is carved from the
same data and no training stage trains on it. The source is either the built-in verifiable tasks (:mod:`spinflow.tasks`) or real chat
data: a local JSONL/Parquet/CSV file or a Hugging Face Hub dataset such as UltraChat-200k, from
which the first user turn (the prompt) and the first assistant turn after it (the real answer) are
kept, as in the SPIN paper.

Bad input stops with one :class:`~spinflow.errors.DataError` line that names the file, the line or
row, and the problem.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from spinflow.config import DataParams
from spinflow.errors import DataError
from spinflow.io import atomic_path, names_local_folder, read_jsonl, write_json, write_jsonl

logger = logging.getLogger(__name__)

SPLITS = ("sft", "val", "pool", "test")
SUMMARY_FILE = "summary.json"
EXTERNAL_TASK = "external"
FORMATS = ("auto", "messages", "columns")

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv",)
DATA_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + CSV_SUFFIXES

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]$")
PROGRESS_MIN_BYTES = 16 * 1024 * 1024
PROGRESS_MIN_ROWS = 50_000
BATCH_ROWS = 4096
ARRAY_HINT = " (the file must hold one JSON object per line, not one JSON array)"


def split_file(data_dir: str | os.PathLike, split: str) -> Path:
    """The path of one prepared split inside ``data_dir``."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (one of {', '.join(SPLITS)})")
    return Path(data_dir) / f"{split}.jsonl"


# --------------------------------------------------------------------------------------------
# Turning one row into a record


class _RowError(Exception):
    """A problem with one row; the reader adds the file and the line or row to it."""


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # refused rather than converted: str(3.0) is "3.0", a float column may have lost digits
        raise _RowError(
            f"{what} holds the number {value!r}, expected text; store prompts and answers as "
            'strings (in JSON: "42", not 42)'
        )
    raise _RowError(f"{what} holds {type(value).__name__}, expected text")


def _missing_column(column: str, key: str, found: Iterable[str], hint: str = "") -> str:
    columns = ", ".join(sorted(str(name) for name in found)) or "none"
    return f"no column {column!r} (set {key} to the column to use{hint}); columns found: {columns}"


class _Extractor:
    """Pulls (prompt, answer) out of rows in the messages or columns format."""

    def __init__(self, fmt: str, messages_column: str, prompt_column: str, response_column: str):
        if fmt not in FORMATS:
            raise DataError(f"unknown data.format {fmt!r} (one of {', '.join(FORMATS)})")
        self.fmt = fmt
        self.messages_column = messages_column
        self.prompt_column = prompt_column
        self.response_column = response_column

    def resolve(self, columns: Iterable[str]) -> str:
        """Settle ``auto`` from the columns present, and check the needed columns exist."""
        columns = list(columns)
        if self.fmt == "auto":
            if self.messages_column in columns:
                self.fmt = "messages"
            elif self.prompt_column in columns:
                self.fmt = "columns"
            else:
                found = ", ".join(sorted(str(name) for name in columns)) or "none"
                raise _RowError(
                    f"no messages column {self.messages_column!r} (data.messages_column) and no "
                    f"prompt column {self.prompt_column!r} (data.prompt_column); "
                    f"columns found: {found}"
                )
        for column, key, hint in self.needed():
            if column not in columns:
                raise _RowError(_missing_column(column, key, columns, hint))
        return self.fmt

    def needed(self) -> list[tuple[str, str, str]]:
        if self.fmt == "messages":
            return [(self.messages_column, "data.messages_column", ", or data.format: columns")]
        return [
            (self.prompt_column, "data.prompt_column", ""),
            (self.response_column, "data.response_column", ""),
        ]

    def columns(self) -> list[str]:
        return [column for column, _, _ in self.needed()]

    def __call__(self, row: dict) -> tuple[str, str]:
        for column, key, hint in self.needed():
            if column not in row:
                raise _RowError(_missing_column(column, key, row.keys(), hint))
        if self.fmt == "messages":
            return self._from_messages(row[self.messages_column])
        prompt = _text(row[self.prompt_column], f"column {self.prompt_column!r}")
        answer = _text(row[self.response_column], f"column {self.response_column!r}")
        if not prompt:
            raise _RowError(f"empty prompt (column {self.prompt_column!r})")
        if not answer:
            raise _RowError(f"empty answer (column {self.response_column!r})")
        return prompt, answer

    def _from_messages(self, messages: Any) -> tuple[str, str]:
        column = self.messages_column
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError:
                raise _RowError(
                    f"column {column!r} is text that is not a JSON list of messages"
                ) from None
        if hasattr(messages, "tolist") and not isinstance(messages, (list, dict)):
            messages = messages.tolist()
        if not isinstance(messages, list):
            raise _RowError(
                f"column {column!r} must be a list of {{role, content}} messages, "
                f"got {type(messages).__name__}"
            )
        prompt = answer = None
        for position, message in enumerate(messages, start=1):
            if not isinstance(message, dict) or "role" not in message:
                raise _RowError(
                    f"message {position} in column {column!r} is not an object with role and content"
                )
            role = message["role"]
            if prompt is None and role == "user":
                prompt = _text(message.get("content"), f"message {position} content")
                if not prompt:
                    raise _RowError(f"empty prompt (message {position}, the first user turn)")
            elif prompt is not None and role == "assistant":
                answer = _text(message.get("content"), f"message {position} content")
                if not answer:
                    raise _RowError(
                        f"empty answer (message {position}, the first assistant turn after the "
                        "first user turn)"
                    )
                break
        if prompt is None:
            raise _RowError(f"no user turn in column {column!r}")
        if answer is None:
            raise _RowError(f"no assistant turn after the first user turn in column {column!r}")
        return prompt, answer


# --------------------------------------------------------------------------------------------
# Readers: each yields (place, row) where place is "line N" or "row N"


def _progress(total: int, desc: str, minimum: int, unit: str):
    from tqdm import tqdm

    show = total >= minimum and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not show, leave=False)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    size = path.stat().st_size
    offset = 0
    with (
        open(path, "rb") as f,
        _progress(size, f"reading {path.name}", PROGRESS_MIN_BYTES, "B") as bar,
    ):
        for number, raw in enumerate(f, start=1):
            start = offset
            offset += len(raw)
            bar.update(len(raw))
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
                start += 3
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad = raw[exc.start : exc.start + 1].hex()
                raise DataError(
                    f"{path}: line {number}: not valid UTF-8 (byte 0x{bad} at byte offset "
                    f"{start + exc.start} of the file, column {exc.start + 1} of the line); "
                    "save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                hint = ARRAY_HINT if line.lstrip().startswith("[") else ""
                raise DataError(
                    f"{path}: line {number}: invalid JSON ({exc.msg} at character "
                    f"{exc.pos + 1}){hint}"
                ) from None
            if not isinstance(row, dict):
                hint = ARRAY_HINT if isinstance(row, list) else ""
                raise DataError(
                    f"{path}: line {number}: expected a JSON object, got {_json_type(row)}{hint}"
                )
            yield f"line {number}", row


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    return "a number"


def _parquet_rows(path: Path, columns_wanted) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read as Parquet: {_one_line(exc)}") from None
    if parquet.metadata.num_rows == 0:
        raise DataError(f"{path}: no rows")
    columns = columns_wanted(names)
    _check_parquet_text_columns(path, parquet.schema_arrow, columns)
    index = 0
    try:
        with _progress(
            parquet.metadata.num_rows, f"reading {path.name}", PROGRESS_MIN_ROWS, "rows"
        ) as bar:
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                for row in batch.to_pylist():
                    index += 1
                    yield f"row {index}", row
                bar.update(batch.num_rows)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: row {index + 1}: cannot read Parquet: {_one_line(exc)}") from None


def _check_parquet_text_columns(path: Path, schema, columns: list[str]) -> None:
    """Prompt and answer columns must hold text: a numeric column is refused up front, naming
    its type, rather than silently turned into strings ("3.0" for 3, digits a float lost)."""
    import pyarrow as pa

    for column in columns:
        if column == "prompt_id":
            continue
        kind = schema.field(column).type
        if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
            raise DataError(
                f"{path}: column {column!r} has the numeric Parquet type {kind}, expected text; "
                f"convert it to strings first (pandas: df[{column!r}] = df[{column!r}].astype(str))"
            )


def _check_utf8(path: Path) -> None:
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad = raw[exc.start : exc.start + 1].hex()
                raise DataError(
                    f"{path}: line {number}: not valid UTF-8 (byte 0x{bad} at byte offset "
                    f"{offset + exc.start} of the file, column {exc.start + 1} of the line); "
                    "save the file as UTF-8"
                ) from None
            offset += len(raw)


def _csv_rows(path: Path, columns_wanted) -> Iterator[tuple[str, dict]]:
    import pandas as pd

    _check_utf8(path)
    try:
        reader = pd.read_csv(
            path,
            dtype=str,
            keep_default_na=False,
            chunksize=BATCH_ROWS,
            encoding="utf-8-sig",
        )
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file (no header and no rows)") from None
    except (pd.errors.ParserError, ValueError, OSError) as exc:
        raise DataError(f"{path}: cannot read as CSV: {_one_line(exc)}") from None
    index = 0
    columns: list[str] | None = None
    try:
        with reader:
            for chunk in reader:
                if columns is None:
                    columns = columns_wanted([str(name) for name in chunk.columns])
                for row in chunk[columns].to_dict("records"):
                    index += 1
                    yield f"row {index}", row
    except pd.errors.ParserError as exc:
        raise DataError(f"{path}: cannot read as CSV: {_one_line(exc)}") from None
    if columns is None:
        header = pd.read_csv(path, nrows=0, encoding="utf-8-sig").columns
        columns_wanted([str(name) for name in header])


def _hub_rows(source: str, split: str, columns_wanted) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        dataset = datasets.load_dataset(source, split=split)
    except Exception as exc:
        raise DataError(
            f"{source}: could not download the dataset from the Hugging Face Hub (split "
            f"{split!r}; {type(exc).__name__}: {_one_line(exc, 200)}) and there is no local "
            "file of that name; check data.source, data.hub_split and the network, or set "
            "data.source to a local .jsonl, .parquet or .csv file, which works offline"
        ) from None
    columns = columns_wanted(list(dataset.column_names))
    index = 0
    for batch in dataset.select_columns(columns).iter(batch_size=BATCH_ROWS):
        size = len(next(iter(batch.values()))) if batch else 0
        for i in range(size):
            index += 1
            yield f"row {index}", {column: batch[column][i] for column in columns}


# --------------------------------------------------------------------------------------------
# Real data


def looks_like_hub_id(source: str) -> bool:
    """Whether ``source``, which does not exist here, is read as a Hub dataset id ``org/name``.

    Not when it ends like a data file, nor when its first folder exists here (``data/chat``
    with a local ``data/``): that is a local path with a typo, reported as a missing file.
    """
    return (
        bool(HUB_ID.match(source))
        and not source.lower().endswith(DATA_SUFFIXES)
        and not names_local_folder(source)
    )


def read_records(
    path: str | os.PathLike,
    *,
    fmt: str = "auto",
    messages_column: str = "messages",
    prompt_column: str = "prompt",
    response_column: str = "response",
    hub_split: str = "train_sft",
) -> tuple[list[dict], int]:
    """Read real chat data; return (records in source order without duplicate prompts, dropped).

    ``path`` is a local ``.jsonl``/``.json`` (JSON lines), ``.parquet`` or ``.csv`` file, or, when
    no such path exists and it looks like ``org/name``, a Hugging Face Hub dataset id read with
    split ``hub_split``. Records are ``{"id", "prompt", "answer", "task": "external",
    "verifier": None}``; the id is the row's ``prompt_id`` if present, else ``row-<index>``
    (0-based index of the row in the source).
    """
    extract = _Extractor(fmt, messages_column, prompt_column, response_column)
    records, duplicates = _read_real(str(path), extract, hub_split)
    return records, duplicates


def _rows_of(source: str, hub_split: str, columns_wanted) -> tuple[str, Iterator[tuple[str, dict]]]:
    """(name used in messages, rows) of a local file or Hub dataset."""
    local = Path(source)
    if local.exists():
        if local.is_dir():
            raise DataError(f"{source}: is a directory, expected a .jsonl, .parquet or .csv file")
        suffix = local.suffix.lower()
        if suffix not in DATA_SUFFIXES:
            raise DataError(
                f"{source}: unsupported file type {suffix or '(no suffix)'!r}; use .jsonl "
                "(one JSON object per line), .parquet or .csv"
            )
        if local.stat().st_size == 0:
            raise DataError(f"{source}: empty file (no rows)")
        if suffix in JSONL_SUFFIXES:
            return source, _jsonl_rows(local)
        if suffix in PARQUET_SUFFIXES:
            return source, _parquet_rows(local, columns_wanted)
        return source, _csv_rows(local, columns_wanted)
    if looks_like_hub_id(source):
        return f"{source} (split {hub_split!r})", _hub_rows(source, hub_split, columns_wanted)
    why = (
        f" (read as a local path, not a Hub dataset id, because {Path(source).parts[0]}/ "
        "exists here)"
        if HUB_ID.match(source) and names_local_folder(source)
        else ""
    )
    raise DataError(f"{source}: file not found{why}")


def _read_real(source: str, extract: _Extractor, hub_split: str) -> tuple[list[dict], int]:
    where = source
    resolved = False

    def columns_wanted(names: list[str]) -> list[str]:
        nonlocal resolved
        try:
            extract.resolve(names)
        except _RowError as exc:
            raise DataError(f"{where}: {exc}") from None
        resolved = True
        return extract.columns() + (["prompt_id"] if "prompt_id" in names else [])

    where, rows = _rows_of(source, hub_split, columns_wanted)
    records: list[dict] = []
    seen_prompts: set[str] = set()
    used_ids: set[str] = set()
    duplicates = 0
    index = -1
    for index, (place, row) in enumerate(rows):
        try:
            if not resolved:
                extract.resolve(row.keys())
                resolved = True
            prompt, answer = extract(row)
        except _RowError as exc:
            raise DataError(f"{where}: {place}: {exc}") from None
        if prompt in seen_prompts:
            duplicates += 1
            continue
        seen_prompts.add(prompt)
        raw_id = row.get("prompt_id")
        record_id = str(raw_id).strip() if raw_id not in (None, "") else f"row-{index}"
        if record_id in used_ids:
            record_id = f"{record_id}-row-{index}"
        used_ids.add(record_id)
        records.append(
            {
                "id": record_id,
                "prompt": prompt,
                "answer": answer,
                "task": EXTERNAL_TASK,
                "verifier": None,
            }
        )
    if index < 0:
        raise DataError(f"{where}: no rows")
    if duplicates:
        logger.warning(
            "%s: dropped %d duplicate prompt(s) (first occurrence kept)", source, duplicates
        )
    return records, duplicates


# --------------------------------------------------------------------------------------------
# The stage


def split_sizes(params: DataParams) -> dict[str, int]:
    """Examples each split draws from the data, in cutting order: with ``data.pool: sft`` the pool
    is taken from the SFT split and draws nothing of its own."""
    pool = params.num_pool if params.pool == "disjoint" else 0
    return {"sft": params.num_sft, "val": params.num_val, "pool": pool, "test": params.num_test}


def _too_few(what: str, available: int, params: DataParams, extra: str = "") -> DataError:
    sizes = {k: v for k, v in split_sizes(params).items() if v or k in ("sft", "test")}
    return DataError(
        f"{what}: {available} unique examples{extra}, but "
        + " + ".join(f"data.num_{k}" for k in sizes)
        + " = "
        + " + ".join(str(v) for v in sizes.values())
        + f" = {sum(sizes.values())}; lower "
        + ", ".join(f"data.num_{k}" for k in sizes)
    )


def _builtin_examples(params: DataParams) -> list[dict]:
    from spinflow import tasks

    total = sum(split_sizes(params).values())
    try:
        examples = tasks.generate_examples(total, params.seed, params.families)
    except ValueError as exc:
        raise DataError(
            f"built-in tasks: {_one_line(exc)} (check data.families, or lower the data.num_* sizes)"
        ) from None
    records = []
    seen: set[str] = set()
    for example in examples:
        record = {
            "id": str(example["id"]),
            "prompt": str(example["prompt"]),
            "answer": str(example["answer"]),
            "task": str(example["task"]),
            "verifier": example.get("verifier"),
        }
        if record["prompt"] in seen:
            raise DataError(f"built-in tasks: prompt {record['prompt']!r} was generated twice")
        seen.add(record["prompt"])
        records.append(record)
    if len(records) < total:
        raise _too_few("built-in tasks", len(records), params)
    return records


def _cut(records: list[dict], params: DataParams) -> dict[str, list[dict]]:
    splits: dict[str, list[dict]] = {}
    start = 0
    for split, size in split_sizes(params).items():
        splits[split] = records[start : start + size]
        start += size
    if params.pool == "sft":
        # the SFT split is already in random order: its first prompts are a random sample
        splits["pool"] = splits["sft"][: params.num_pool]
    return {split: splits[split] for split in SPLITS}


def build_splits(params: DataParams) -> tuple[dict[str, list[dict]], dict]:
    """Read or generate the data and cut it into the splits; returns (splits, summary)."""
    total = sum(split_sizes(params).values())
    rng = random.Random(params.seed)
    summary: dict[str, Any] = {"source": params.source, "seed": params.seed, "pool": params.pool}
    if params.source == "builtin":
        records = _builtin_examples(params)
        rng.shuffle(records)
        chosen = records[:total]
        summary.update(
            format="builtin",
            families=params.families,
            hub_split=None,
            rows_read=len(records),
            duplicates_dropped=0,
            unique_examples=len(records),
        )
    else:
        extract = _Extractor(
            params.format, params.messages_column, params.prompt_column, params.response_column
        )
        records, duplicates = _read_real(params.source, extract, params.hub_split)
        if len(records) < total:
            extra = f" ({duplicates} duplicate prompts dropped)" if duplicates else ""
            raise _too_few(params.source, len(records), params, extra)
        order = list(range(len(records)))
        rng.shuffle(order)
        chosen = [records[i] for i in order[:total]]
        from_hub = not Path(params.source).exists() and looks_like_hub_id(params.source)
        summary.update(
            format=extract.fmt,
            families=None,
            hub_split=params.hub_split if from_hub else None,
            rows_read=len(records) + duplicates,
            duplicates_dropped=duplicates,
            unique_examples=len(records),
        )
    splits = _cut(chosen, params)
    summary["counts"] = {split: len(rows) for split, rows in splits.items()}
    summary["task_counts"] = {
        split: dict(sorted(Counter(record["task"] for record in rows).items()))
        for split, rows in splits.items()
    }
    return splits, summary


def prepare_data(
    params: DataParams, out_dir: str | os.PathLike, files: dict[str, Any] | None = None
) -> dict:
    """Write ``sft.jsonl``, ``val.jsonl``, ``pool.jsonl``, ``test.jsonl`` and ``summary.json``
    into ``out_dir``,
    with ``files`` (name: JSON object, such as provenance.json).

    The directory is written next to its place and renamed into it only when complete, so a
    failure leaves an earlier ``out_dir`` as it was. Returns the summary.
    """
    splits, summary = build_splits(params)
    with atomic_path(out_dir, directory=True) as tmp:
        for split, rows in splits.items():
            write_jsonl(split_file(tmp, split), rows)
        write_json(tmp / SUMMARY_FILE, summary)
        for name, obj in (files or {}).items():
            write_json(tmp / name, obj)
    logger.info(
        "prepared data from %s: %s (%d duplicate prompts dropped)",
        params.source,
        ", ".join(f"{split} {count}" for split, count in summary["counts"].items()),
        summary["duplicates_dropped"],
    )
    return summary


def load_split(data_dir: str | os.PathLike, split: str) -> list[dict]:
    """Read one prepared split."""
    path = split_file(data_dir, split)
    if not path.is_file():
        raise DataError(f"{path}: file not found; run `dvc repro prepare_data` to prepare the data")
    try:
        return read_jsonl(path, required=("prompt", "answer"))
    except DataError as exc:
        raise DataError(f"{exc}; run `dvc repro prepare_data` again") from None
