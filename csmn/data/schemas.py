"""The Arrow schemas of every table that crosses a stage, loaded from ``schemas/*.json``.

A schema file lists fields with a small type grammar (``string``, ``int32``, ``float32``,
``timestamp[us, UTC]``, ``list<T>``, ``fixed_size_list<T>[N]``) so that it stays readable
and diffable. Tables are validated when written (:func:`conform`) and when read
(:func:`validate`); single records are checked with :func:`record_problem` so a reader can
send a bad record to ``rejects/`` instead of failing the batch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import pyarrow as pa

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"

_PRIMITIVES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "large_string": pa.large_string(),
    "binary": pa.binary(),
    "bool": pa.bool_(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float16": pa.float16(),
    "float32": pa.float32(),
    "float64": pa.float64(),
}


class SchemaError(ValueError):
    """A table or record does not fit its declared schema."""


def parse_type(text: str) -> pa.DataType:
    text = text.strip()
    if text in _PRIMITIVES:
        return _PRIMITIVES[text]
    match = re.fullmatch(r"timestamp\[(\w+)(?:,\s*(\S+))?\]", text)
    if match:
        return pa.timestamp(match.group(1), tz=match.group(2))
    match = re.fullmatch(r"fixed_size_list<(.+)>\[(\d+)\]", text)
    if match:
        return pa.list_(parse_type(match.group(1)), int(match.group(2)))
    match = re.fullmatch(r"list<(.+)>", text)
    if match:
        return pa.list_(parse_type(match.group(1)))
    raise SchemaError(f"unknown type in schema file: {text!r}")


@cache
def load_schema(name: str) -> pa.Schema:
    """The Arrow schema ``schemas/<name>.json``, with field descriptions as metadata."""
    path = SCHEMA_DIR / f"{name}.json"
    if not path.exists():
        raise SchemaError(f"no schema named {name!r} in {SCHEMA_DIR}")
    spec = json.loads(path.read_text())
    fields = []
    for field in spec["fields"]:
        metadata = {"description": field["description"]} if "description" in field else None
        fields.append(
            pa.field(
                field["name"],
                parse_type(field["type"]),
                nullable=field.get("nullable", True),
                metadata=metadata,
            )
        )
    return pa.schema(fields, metadata={"name": spec["name"]})


def _check_nulls(table: pa.Table, schema: pa.Schema, name: str) -> None:
    for field in schema:
        if not field.nullable and table.column(field.name).null_count:
            raise SchemaError(f"{name}: column {field.name!r} has nulls but is not nullable")


def validate(table: pa.Table, name: str, columns: Sequence[str] | None = None) -> pa.Table:
    """Check a table read back from storage: same columns and types, no forbidden nulls.
    ``columns``: only these of the schema's (a reader that reads some of them), in that
    order."""
    schema = load_schema(name)
    if columns is not None:
        unknown = [c for c in columns if c not in schema.names]
        if unknown:
            raise SchemaError(f"{name}: no column(s) {unknown} in the schema")
        schema = pa.schema([schema.field(c) for c in columns], metadata=schema.metadata)
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise SchemaError(f"{name}: missing column(s) {missing}")
    for field in schema:
        actual = table.schema.field(field.name).type
        if actual != field.type:
            raise SchemaError(f"{name}: column {field.name!r} is {actual}, expected {field.type}")
    _check_nulls(table, schema, name)
    return table.select(schema.names)


def conform(data: pa.Table | list[dict[str, Any]] | dict[str, list], name: str) -> pa.Table:
    """Build or cast data to the schema before writing; raises :class:`SchemaError` if it can't."""
    schema = load_schema(name)
    try:
        if isinstance(data, pa.Table):
            missing = [f.name for f in schema if f.name not in data.column_names]
            if missing:
                raise SchemaError(f"{name}: missing column(s) {missing}")
            table = data.select(schema.names).cast(schema)
        elif isinstance(data, dict):
            table = pa.Table.from_pydict(data, schema=schema)
        else:
            table = pa.Table.from_pylist(list(data), schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError, TypeError) as err:
        raise SchemaError(f"{name}: {err}") from err
    _check_nulls(table, schema, name)
    return table.replace_schema_metadata(schema.metadata)


def _value_problem(value: Any, dtype: pa.DataType, path: str) -> str | None:
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return None if isinstance(value, str) else f"{path} must be a string"
    if pa.types.is_integer(dtype):
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"{path} must be an integer"
    if pa.types.is_floating(dtype):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"{path} must be a number"
    if pa.types.is_boolean(dtype):
        return None if isinstance(value, bool) else f"{path} must be a boolean"
    if pa.types.is_timestamp(dtype):
        return None if isinstance(value, datetime) else f"{path} must be a timestamp"
    if pa.types.is_list(dtype) or pa.types.is_fixed_size_list(dtype):
        if not isinstance(value, (list, tuple)):
            return f"{path} must be a list"
        if pa.types.is_fixed_size_list(dtype) and len(value) != dtype.list_size:
            return f"{path} must have {dtype.list_size} items, has {len(value)}"
        for i, item in enumerate(value):
            problem = _value_problem(item, dtype.value_type, f"{path}[{i}]")
            if problem:
                return problem
        return None
    return None


def _is_string_list(value: Any) -> bool:
    if type(value) is not list:
        return False
    try:
        "".join(value)  # raises TypeError on the first item that is not a str
    except TypeError:
        return False
    return True


def _fast_check(dtype: pa.DataType) -> Callable[[Any], bool] | None:
    """A check that passes the common well-typed values of ``dtype`` quickly, or None.

    It only ever says yes where :func:`_value_problem` finds no problem; a value it does not
    pass goes through :func:`_value_problem`, which alone words the problem. Readers and
    stage 1 check every raw post, so the generic walk was a tenth of preprocessing.
    """
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return lambda value: type(value) is str
    if pa.types.is_timestamp(dtype):
        return lambda value: type(value) is datetime
    if pa.types.is_list(dtype) and pa.types.is_string(dtype.value_type):
        return _is_string_list
    return None


@cache
def _record_checks(name: str) -> tuple[tuple[str, bool, Any, Callable[[Any], bool] | None], ...]:
    return tuple((f.name, f.nullable, f.type, _fast_check(f.type)) for f in load_schema(name))


def record_problem(record: dict[str, Any], name: str) -> str | None:
    """Why ``record`` does not fit the schema (first problem found), or None if it fits."""
    for field_name, nullable, dtype, fast in _record_checks(name):
        value = record.get(field_name)
        if value is None:
            if not nullable:
                return f"missing required field {field_name!r}"
            continue
        if fast is not None and fast(value):
            continue
        problem = _value_problem(value, dtype, field_name)
        if problem:
            return problem
    return None
