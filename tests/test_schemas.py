"""Schema validation and version errors for every table in schemas/ and the manifest.

Tables are discovered from the package, so a table added later is covered too."""
from __future__ import annotations

import importlib
import json
import pkgutil
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas
from schemas import SchemaError, TableSchema, describe, table_version, validate
from schemas.index import INDEX, MANIFEST_VERSION, check_manifest


def all_tables() -> list[TableSchema]:
    found = {}
    for mod in pkgutil.iter_modules(schemas.__path__):
        module = importlib.import_module(f"schemas.{mod.name}")
        for value in vars(module).values():
            if isinstance(value, TableSchema):
                found[value.name] = value
    return [found[k] for k in sorted(found)]


TABLES = all_tables()


def value_for(t: pa.DataType):
    if pa.types.is_string(t):
        return "x"
    if pa.types.is_binary(t):
        return b"\x00\x01"
    if pa.types.is_boolean(t):
        return True
    if pa.types.is_integer(t):
        return 3
    if pa.types.is_floating(t):
        return 0.5
    if pa.types.is_fixed_size_list(t):
        return [value_for(t.value_type)] * t.list_size
    if pa.types.is_list(t):
        return [value_for(t.value_type)]
    if pa.types.is_struct(t):
        return {f.name: value_for(f.type) for f in t}
    raise AssertionError(f"no test value for {t}")


def full_row(spec: TableSchema) -> dict:
    return {f.name: value_for(f.type) for f in spec.schema}


def with_version(table: pa.Table, version: str, name: str | None = None) -> pa.Table:
    meta = dict(table.schema.metadata or {})
    meta[b"schema_version"] = version.encode()
    if name:
        meta[b"table"] = name.encode()
    return table.replace_schema_metadata(meta)


def test_every_table_is_found_and_documented():
    assert {"proposals", "index"} <= {t.name for t in TABLES}
    for spec in TABLES:
        assert set(spec.docs) == set(spec.schema.names)
        assert all(spec.docs.values())
        assert len(describe(spec).splitlines()) == len(spec.schema) + 4


@pytest.mark.parametrize("spec", TABLES, ids=lambda s: s.name)
def test_round_trip_through_parquet_keeps_version_and_params(spec, tmp_path):
    table = spec.from_rows([full_row(spec)], params={"seed": 7})
    pq.write_table(table, tmp_path / "t.parquet")
    back = pq.read_table(tmp_path / "t.parquet")
    assert table_version(back.schema) == (spec.name, spec.version)
    assert schemas.table_params(back.schema) == {"seed": 7}
    assert validate(back, spec, "t.parquet").to_pylist() == table.to_pylist()


@pytest.mark.parametrize("spec", TABLES, ids=lambda s: s.name)
def test_bad_columns_are_refused_by_name(spec):
    good = spec.from_rows([full_row(spec)])
    required = [f.name for f in spec.schema if not f.nullable]
    with pytest.raises(SchemaError, match=f"required column {required[0]!r} is missing"):
        validate(good.drop_columns([required[0]]), spec, "src.parquet")
    with pytest.raises(SchemaError, match=r"unknown columns \['surprise'\]"):
        validate(good.append_column("surprise", pa.array([1])), spec, "src.parquet")
    nulled = good.set_column(good.schema.get_field_index(required[0]),
                             pa.field(required[0], good.schema.field(required[0]).type),
                             pa.nulls(1, good.schema.field(required[0]).type))
    with pytest.raises(SchemaError, match=f"{required[0]!r} has 1 nulls"):
        validate(nulled, spec, "src.parquet")
    binary = next((f for f in spec.schema if pa.types.is_list(f.type)), None)
    if binary is not None:
        wrong = good.set_column(good.schema.get_field_index(binary.name), binary.name,
                                pa.array(["not a list"]))
        with pytest.raises(SchemaError, match=f"column {binary.name!r} has type string"):
            validate(wrong, spec, "src.parquet")


@pytest.mark.parametrize("spec", TABLES, ids=lambda s: s.name)
def test_versions(spec):
    table = spec.from_rows([full_row(spec)])
    major = spec.major
    newer = with_version(table, f"{major + 1}.0")
    with pytest.raises(SchemaError, match=rf"src\.parquet: .*newer than .*Upgrade this package"):
        validate(newer, spec, "src.parquet")
    with pytest.raises(SchemaError, match="older than"):
        validate(with_version(table, f"{major - 1}.4"), spec, "src.parquet")
    with pytest.raises(SchemaError, match="holds table 'other'"):
        validate(with_version(table, spec.version, name="other"), spec, "src.parquet")
    unversioned = table.replace_schema_metadata({b"table": spec.name.encode()})
    with pytest.raises(SchemaError, match="no schema_version"):
        schemas.check_version(unversioned.schema, spec, "src.parquet")
    # a newer minor version is readable, and a column an older minor lacked comes back null
    assert validate(with_version(table, f"{major}.99"), spec, "src.parquet").num_rows == 1
    nullable = [f.name for f in spec.schema if f.nullable][-1]
    older = validate(with_version(table.drop_columns([nullable]), f"{major}.0"), spec, "s")
    assert older.column(nullable).null_count == 1 and older.schema.names == spec.schema.names


def good_manifest() -> dict:
    return {"schema_version": MANIFEST_VERSION, "dataset": "d", "num_samples": 0, "shards": [],
            "packing": {}, "preprocessing": {}, "packages": {}}


def test_manifest_versions_and_required_keys():
    assert check_manifest(good_manifest(), "m.json")["dataset"] == "d"
    major = int(MANIFEST_VERSION.split(".")[0])
    with pytest.raises(SchemaError, match="m.json: manifest schema version .* newer"):
        check_manifest(good_manifest() | {"schema_version": f"{major + 1}.0"}, "m.json")
    with pytest.raises(SchemaError, match="older"):
        check_manifest(good_manifest() | {"schema_version": f"{major - 1}.0"}, "m.json")
    assert check_manifest(good_manifest() | {"schema_version": f"{major}.7"}, "m.json")
    lacking = good_manifest()
    del lacking["shards"]
    with pytest.raises(SchemaError, match=r"lacks \['shards'\]"):
        check_manifest(lacking, "m.json")
    with pytest.raises(SchemaError, match="no schema_version"):
        check_manifest({"dataset": "d"}, "m.json")


def test_reader_refuses_newer_index_and_manifest(sample_shards, tmp_path):
    from shards.reader import ShardDataset
    out = tmp_path / "shards"
    shutil.copytree(sample_shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(manifest | {"schema_version": "9.0"}))
    with pytest.raises(SchemaError, match="manifest.json: manifest schema version 9.0 is newer"):
        ShardDataset(out)
    (out / "manifest.json").write_text(json.dumps(manifest))
    index = pq.read_table(out / "index.parquet")
    pq.write_table(with_version(index, f"{INDEX.major + 1}.0"), out / "index.parquet")
    with pytest.raises(SchemaError, match=r"index.parquet: table 'index' has schema version 2.0"):
        ShardDataset(out)
