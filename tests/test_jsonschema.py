"""The committed JSON Schema files (schemas/json/) match the pydantic models of the contract."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import pytest

from homenet.schemas.jsonschema import generate
from homenet.schemas.messages import BODIES

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas" / "json"
REGENERATE = "run `python -m homenet.schemas.jsonschema` and commit schemas/json/"
COMMITTED = sorted(p.name for p in SCHEMA_DIR.glob("*.json"))


def test_committed_schema_files_are_exactly_the_generated_set():
    generated = sorted(generate())
    assert COMMITTED == generated, (
        f"schemas/json/ holds {COMMITTED} but the models give {generated}: {REGENERATE}")


@pytest.mark.parametrize("name", sorted(generate()))
def test_committed_schema_equals_the_generated_one(name):
    path = SCHEMA_DIR / name
    expected = generate()[name]
    assert path.exists(), f"schemas/json/{name} is missing: {REGENERATE}"
    committed = path.read_text(encoding="utf-8")
    if committed != expected:
        diff = "".join(difflib.unified_diff(committed.splitlines(True), expected.splitlines(True),
                                            f"committed/{name}", f"generated/{name}", n=2))
        pytest.fail(f"schemas/json/{name} has drifted from the models: {REGENERATE}\n{diff[:4000]}")


def test_every_kind_and_the_envelope_have_a_schema():
    assert {f"{kind}.json" for kind in BODIES} | {"envelope.json", "status.json"} == set(generate())


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_schema_is_valid_json_with_an_id(name):
    schema = json.loads((SCHEMA_DIR / name).read_text(encoding="utf-8"))
    assert isinstance(schema, dict)
    assert schema.get("$id") == f"https://homenet.invalid/schemas/v1/{name}"
    assert schema.get("type") == "object"
    assert "properties" in schema


def test_envelope_schema_uses_the_wire_name_from():
    schema = json.loads((SCHEMA_DIR / "envelope.json").read_text(encoding="utf-8"))
    assert "from" in schema["properties"] and "sender" not in schema["properties"]
    assert "from" in schema["required"]


def test_generation_is_deterministic():
    assert generate() == generate()


def test_committed_schema_dir_exists():
    assert COMMITTED, f"no schema files in {SCHEMA_DIR}: {REGENERATE}"


def _properties(schema: dict, where: str):
    """(path, property schema) of every field of the schema and of its definitions."""
    for name, prop in schema.get("properties", {}).items():
        yield f"{where}.{name}", prop
    for name, definition in schema.get("$defs", {}).items():
        yield from _properties(definition, f"{where}/$defs/{name}")


@pytest.mark.parametrize("name", sorted(generate()))
def test_every_field_has_a_description(name):
    """The schemas are the reference a maker reads beside docs/protocol.md: no field unexplained."""
    schema = json.loads(generate()[name])
    bare = [path for path, prop in _properties(schema, name) if not prop.get("description")]
    assert not bare, f"fields without a description: {bare}"


def test_the_envelope_lists_every_kind_and_the_encodings_of_keys_and_signatures():
    schema = json.loads(generate()["envelope.json"])
    assert schema["properties"]["kind"]["enum"] == sorted(BODIES)
    assert schema["properties"]["sig"]["pattern"] == r"^[A-Za-z0-9+/]{85}[AQgw]==$"
    register = json.loads(generate()["register.json"])
    assert register["properties"]["public_key"]["pattern"] == r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$"
    result = json.loads(generate()["config.result.json"])
    assert "port_mapping:(tcp|udp)" in result["$defs"]["ItemResult"]["properties"]["item"]["pattern"]
