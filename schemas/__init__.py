"""Arrow schemas of every table we write, versioned, with one validate() for writers and readers.

Versions are "MAJOR.MINOR". A reader accepts any minor version of its major (new
columns are nullable additions) and refuses a newer major with a message that says
so. The version, the table name and the producing parameters travel in the Parquet
key-value metadata, so a file describes itself."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa


class SchemaError(ValueError):
    pass


@dataclass(frozen=True)
class TableSchema:
    name: str
    version: str
    schema: pa.Schema
    docs: dict[str, str]

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def with_metadata(self, params: dict | None = None) -> pa.Schema:
        meta = {b"table": self.name.encode(), b"schema_version": self.version.encode()}
        if params is not None:
            meta[b"params"] = json.dumps(params, sort_keys=True).encode()
        return self.schema.with_metadata(meta)

    def empty(self, params: dict | None = None) -> pa.Table:
        return self.with_metadata(params).empty_table()

    def from_rows(self, rows: list[dict], params: dict | None = None) -> pa.Table:
        table = pa.Table.from_pylist(rows, schema=self.with_metadata(params))
        validate(table, self, source="rows being written")
        return table


def table_version(schema: pa.Schema) -> tuple[str | None, str | None]:
    meta = schema.metadata or {}
    name = meta.get(b"table")
    version = meta.get(b"schema_version")
    return (name.decode() if name else None, version.decode() if version else None)


def table_params(schema: pa.Schema) -> dict:
    raw = (schema.metadata or {}).get(b"params")
    return json.loads(raw) if raw else {}


def check_version(schema: pa.Schema, spec: TableSchema, source: str) -> None:
    name, version = table_version(schema)
    if name is not None and name != spec.name:
        raise SchemaError(f"{source}: holds table {name!r}, expected {spec.name!r}")
    if version is None:
        raise SchemaError(f"{source}: no schema_version in its metadata; it was not written "
                          f"by this pipeline, or by a version too old to read. Regenerate it.")
    major = int(version.split(".")[0])
    if major > spec.major:
        raise SchemaError(
            f"{source}: table {spec.name!r} has schema version {version}, newer than the "
            f"{spec.version} this code reads (major {major} > {spec.major}). "
            f"Upgrade this package, or regenerate the data with this version.")
    if major < spec.major:
        raise SchemaError(
            f"{source}: table {spec.name!r} has schema version {version}, older than the "
            f"{spec.version} this code reads. Regenerate the data with this version.")


def validate(table: pa.Table, spec: TableSchema, source: str) -> pa.Table:
    """Check columns and types against `spec`; return the table cast to the spec's order.

    Columns missing from an older minor version are added as nulls, so readers see one
    shape. Extra columns are an error: they would be lost silently otherwise."""
    if table.schema.metadata and b"schema_version" in table.schema.metadata:
        check_version(table.schema, spec, source)
    expected = {f.name: f for f in spec.schema}
    extra = [n for n in table.column_names if n not in expected]
    if extra:
        raise SchemaError(f"{source}: unknown columns {extra} for table {spec.name!r} "
                          f"v{spec.version}")
    columns = []
    for field in spec.schema:
        if field.name not in table.column_names:
            if not field.nullable:
                raise SchemaError(f"{source}: required column {field.name!r} is missing")
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        col = table.column(field.name)
        if not col.type.equals(field.type):
            try:
                col = col.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise SchemaError(f"{source}: column {field.name!r} has type {col.type}, "
                                  f"expected {field.type}") from e
        if not field.nullable and col.null_count:
            raise SchemaError(f"{source}: column {field.name!r} has {col.null_count} nulls "
                              "but is required")
        columns.append(col)
    meta = table.schema.metadata or spec.with_metadata().metadata
    return pa.Table.from_arrays(columns, schema=spec.schema.with_metadata(meta))


def field(name: str, type_: pa.DataType, doc: str, nullable: bool = True) -> tuple[pa.Field, str]:
    return pa.field(name, type_, nullable=nullable, metadata={b"doc": doc.encode()}), doc


def make_table_schema(name: str, version: str, fields: list[tuple[pa.Field, str]]) -> TableSchema:
    return TableSchema(name, version, pa.schema([f for f, _ in fields]),
                       {f.name: doc for f, doc in fields})


def describe(spec: TableSchema) -> str:
    """Markdown table of the fields, for the README and `--describe` flags."""
    lines = [f"Table `{spec.name}` v{spec.version}", "", "| column | type | meaning |", "|---|---|---|"]
    for f in spec.schema:
        lines.append(f"| {f.name} | {f.type} | {spec.docs[f.name]} |")
    return "\n".join(lines)
