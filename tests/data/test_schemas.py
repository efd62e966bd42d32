"""Schema validation both ways: at write (conform) and at read (validate), and per record."""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa
import pytest

from csmn.data import rejects, storage
from csmn.data.schemas import (
    SCHEMA_DIR,
    SchemaError,
    conform,
    load_schema,
    parse_type,
    record_problem,
    validate,
)

POST = {
    "user_id": "u1",
    "post_id": "p1",
    "created_at": datetime(2016, 5, 1, tzinfo=UTC),
    "image": "images/u1/p1.jpg",
    "caption": "a sunny day at the beach",
    "hashtags": ["beach", "#sun"],
}


def test_type_grammar():
    assert parse_type("list<string>") == pa.list_(pa.string())
    assert parse_type("fixed_size_list<float32>[2048]") == pa.list_(pa.float32(), 2048)
    assert parse_type("timestamp[us, UTC]") == pa.timestamp("us", tz="UTC")
    with pytest.raises(SchemaError):
        parse_type("decimal")


def test_every_schema_file_loads():
    for path in sorted(SCHEMA_DIR.glob("*.json")):
        schema = load_schema(path.stem)
        assert len(schema) > 0 and schema.metadata[b"name"] == path.stem.encode()


def test_conform_then_validate_round_trip(tmp_path):
    table = conform([POST], "raw_post")
    uri = str(tmp_path / "posts.parquet")
    storage.write_parquet(uri, table)
    back = validate(storage.read_parquet(uri), "raw_post")
    assert back.to_pylist()[0]["hashtags"] == ["beach", "#sun"]


def test_conform_rejects_missing_required_values():
    with pytest.raises(SchemaError, match="user_id"):
        conform([{**POST, "user_id": None}], "raw_post")
    with pytest.raises(SchemaError):
        conform(pa.table({"user_id": ["u"]}), "raw_post")


def test_validate_catches_wrong_types_on_read():
    table = conform([POST], "raw_post")
    wrong = table.set_column(
        table.schema.get_field_index("caption"), "caption", pa.array([1], pa.int64())
    )
    with pytest.raises(SchemaError, match="caption"):
        validate(wrong, "raw_post")
    with pytest.raises(SchemaError, match="missing"):
        validate(table.drop_columns(["image"]), "raw_post")


def test_record_problem_names_the_field():
    assert record_problem(POST, "raw_post") is None
    assert "post_id" in record_problem({**POST, "post_id": None}, "raw_post")
    assert "hashtags" in record_problem({**POST, "hashtags": "beach"}, "raw_post")
    assert "hashtags[1]" in record_problem({**POST, "hashtags": ["a", 3]}, "raw_post")
    assert record_problem({**POST, "created_at": None}, "raw_post") is None


def test_reject_rows_round_trip_and_count_by_code(tmp_path):
    root = str(tmp_path)
    rows = [
        rejects.reject_row("read", "bad_json: Expecting value", source="a.jsonl:3", payload="{"),
        rejects.reject_row("read", "bad_json: Extra data", source="a.jsonl:9", payload="{}}"),
        rejects.reject_row("read", "missing_field: user_id", record_id="p7", payload={"x": 1}),
    ]
    rejects.write_rejects(root, "read", rows)
    assert rejects.count_rejects(root, "read") == {"bad_json": 2, "missing_field": 1}
    assert rejects.read_rejects(root, "read")[2]["payload"] == '{"x": 1}'
    assert rejects.write_rejects(root, "read", []) is None
    long = rejects.reject_row("read", "too_long: x", payload="y" * 5000)
    assert len(long["payload"]) <= rejects.PAYLOAD_LIMIT + 1


def test_examples_and_contexts_are_validated_when_read(tmp_path):
    """A part another tool wrote with other types or nulls is refused where it is read, not
    turned into a wrong training input (int64 ids, float contexts, null ids)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from csmn.data import layout
    from csmn.data.schemas import SchemaError
    from csmn.eval.baselines import load_training_set
    from csmn.pipeline.train_data import read_examples

    root = str(tmp_path)
    folder = tmp_path / layout.examples_dir(root, "hashtag", "train")[len(root) + 1:]
    folder.mkdir(parents=True)
    pq.write_table(pa.table({
        "user_id": ["u1", None], "post_id": [None, "p2"], "image": ["a.jpg", None],
        "text": ["#a", "#b"], "token_ids": pa.array([[4, 2], [5, 2]], pa.list_(pa.int64())),
        "context_ids": pa.array([[1.0], [2.0]], pa.list_(pa.float64())),
        "context_words": [["#a"], ["#b"]]}), folder / "part-0.parquet")
    with pytest.raises(SchemaError, match="token_ids|context_ids"):
        read_examples(root, "hashtag", "train")
    with pytest.raises(SchemaError, match="has nulls"):
        read_examples(root, "hashtag", "train", columns=("image", "text"))
    with pytest.raises(SchemaError, match="has nulls"):
        load_training_set(root, "hashtag")
