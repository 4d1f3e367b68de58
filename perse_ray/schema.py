"""The Arrow schemas that connect the stages: subjects → frames → avatars.

Every table written by a stage carries ``perse_ray.schema`` and ``perse_ray.schema_version`` in its
schema metadata; ``validate`` checks a table against the contract and names what does not match.
"""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = "1"

SUBJECT_STATUS = ("ok", "quarantined")
# Subject ids become folder names everywhere (frames partitions, registry, URLs): a plain slug.
SUBJECT_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def validate_subject_id(subject_id: str) -> str:
    """Raise ``ValueError`` unless ``subject_id`` is a slug that cannot escape a folder."""
    if not isinstance(subject_id, str) or not SUBJECT_ID.match(subject_id):
        raise ValueError(f"invalid subject id {subject_id!r}: expected 1-63 chars of [a-z0-9-], "
                         "starting with a letter or digit")
    return subject_id

_camera = pa.struct([
    ("yaw", pa.float32()),  # degrees, + turns the head to its left (camera moves right)
    ("pitch", pa.float32()),  # degrees, + looks from above
    ("K", pa.list_(pa.float32(), 9)),  # row-major 3x3 intrinsics in pixels of this frame
    ("viewmat", pa.list_(pa.float32(), 16)),  # row-major 4x4 world-to-camera (OpenCV axes)
])

_interpolation = pa.struct([
    ("from_edit", pa.int16()),
    ("to_edit", pa.int16()),
    ("alpha", pa.float32()),
])


def _schema(name: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={"perse_ray.schema": name, "perse_ray.schema_version": SCHEMA_VERSION})


SUBJECTS = _schema("subjects", [
    pa.field("subject_id", pa.string(), nullable=False),  # safe slug + short content hash
    pa.field("source_path", pa.string(), nullable=False),
    pa.field("content_sha256", pa.string()),
    pa.field("status", pa.string(), nullable=False),  # ok | quarantined
    pa.field("reason", pa.string()),  # why quarantined, or how the image was chosen
    pa.field("face_box", pa.list_(pa.float32(), 4)),  # x0, y0, x1, y1 in source pixels
    pa.field("landmarks", pa.list_(pa.list_(pa.float32(), 2))),  # in aligned-portrait pixels
    pa.field("identity", pa.list_(pa.float32())),  # identity embedding of the source face
    pa.field("portrait_png", pa.binary()),  # aligned square portrait
])

FRAMES = _schema("frames", [
    pa.field("subject_id", pa.string(), nullable=False),
    pa.field("attribute", pa.string(), nullable=False),  # "" for source frames (edit 0)
    pa.field("edit_index", pa.int16(), nullable=False),  # 0 = the unedited source
    pa.field("interpolation", _interpolation),  # null unless a morph reference
    pa.field("frame_index", pa.int32(), nullable=False),  # index into the shared motion script
    pa.field("camera", _camera, nullable=False),
    pa.field("expression", pa.map_(pa.string(), pa.float32()), nullable=False),
    pa.field("image_png", pa.binary(), nullable=False),
    pa.field("mask_png", pa.binary()),  # region the edit changed (attribute frames), else null
    pa.field("id_score", pa.float32()),  # identity similarity to the source in [0, 1]
    pa.field("kept", pa.bool_(), nullable=False),
    pa.field("drop_reason", pa.string()),
    # Other attributes' edit levels composed into this frame (null: only ``attribute`` is edited).
    # Composed frames teach the decoder that its branches add up: never-trained slider combinations.
    pa.field("also_edits", pa.map_(pa.string(), pa.float32())),
])
# Columns added after version 1 was first written: tables without them read as all-null.
ADDED_COLUMNS = {"frames": ("also_edits",)}

AVATARS = _schema("avatars", [
    pa.field("subject_id", pa.string(), nullable=False),
    pa.field("version", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),  # relative to the registry root
    pa.field("latent_layout", pa.string(), nullable=False),  # JSON of the avatar's LatentLayout
    pa.field("metrics", pa.map_(pa.string(), pa.float64())),
    pa.field("created_at", pa.timestamp("s", tz="UTC"), nullable=False),
])

SCHEMAS = {"subjects": SUBJECTS, "frames": FRAMES, "avatars": AVATARS}


class SchemaError(ValueError):
    """A table that does not match a stage's contract."""


def validate(table: pa.Table, name: str) -> pa.Table:
    """Check ``table`` against schema ``name``; return it cast to the exact schema (with metadata).

    Missing or extra columns, incompatible types, nulls in non-null columns and an unknown
    status raise ``SchemaError`` naming the column.
    """
    if name not in SCHEMAS:
        raise SchemaError(f"unknown schema {name!r}; choices: {', '.join(SCHEMAS)}")
    schema = SCHEMAS[name]
    version = (table.schema.metadata or {}).get(b"perse_ray.schema_version")
    if version is not None and version.decode() != SCHEMA_VERSION:
        raise SchemaError(f"{name}: schema version {version.decode()} != supported {SCHEMA_VERSION}")
    for added in ADDED_COLUMNS.get(name, ()):
        if added not in table.column_names:
            table = table.append_column(added, pa.nulls(table.num_rows, schema.field(added).type))
    missing = [f.name for f in schema if f.name not in table.column_names]
    extra = [c for c in table.column_names if c not in schema.names]
    if missing or extra:
        raise SchemaError(f"{name}: missing columns {missing}, unexpected columns {extra}")
    table = table.select(schema.names)
    for f in schema:
        col = table.column(f.name)
        if not col.type.equals(f.type):
            try:
                col = col.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise SchemaError(f"{name}.{f.name}: type {col.type} does not fit {f.type}: {e}") from e
        if not f.nullable and col.null_count:
            raise SchemaError(f"{name}.{f.name}: {col.null_count} null value(s) in a required column")
        table = table.set_column(schema.get_field_index(f.name), f, col)
    if name == "subjects":
        bad = set(table.column("status").to_pylist()) - set(SUBJECT_STATUS)
        if bad:
            raise SchemaError(f"subjects.status: unknown value(s) {sorted(bad)}; choices: {SUBJECT_STATUS}")
    return table.replace_schema_metadata(schema.metadata)


def table_from_rows(rows: list[dict[str, Any]], name: str) -> pa.Table:
    """Rows (plain dicts; ``expression``/``metrics`` as dicts) → a validated table of schema ``name``."""
    schema = SCHEMAS[name]
    try:
        table = pa.Table.from_pylist([_to_arrow_row(r, schema) for r in rows], schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as e:
        raise SchemaError(f"{name}: rows do not fit the schema: {e}") from e
    return validate(table, name)


def rows_from_table(table: pa.Table) -> list[dict[str, Any]]:
    """The inverse of ``table_from_rows``: map columns come back as dicts."""
    rows = table.to_pylist()
    map_cols = [f.name for f in table.schema if pa.types.is_map(f.type)]
    for row in rows:
        for c in map_cols:
            if row[c] is not None:
                row[c] = dict(row[c])
    return rows


def _to_arrow_row(row: dict[str, Any], schema: pa.Schema) -> dict[str, Any]:
    extra = set(row) - set(schema.names)
    if extra:
        raise KeyError(f"unexpected field(s) {sorted(extra)}")
    out = {}
    for f in schema:
        value = row.get(f.name)
        if pa.types.is_map(f.type) and isinstance(value, dict):
            value = list(value.items())
        out[f.name] = value
    return out
