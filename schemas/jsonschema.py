"""JSON Schema files for agents written in other languages, generated from the models.

`python -m homenet.schemas.jsonschema` rewrites schemas/json/; a test fails when the
committed files drift from the models.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .envelope import Envelope
from .messages import BODIES, DeviceStatus

SCHEMA_DIR = Path(__file__).parent / "json"


def generate() -> dict[str, str]:
    """File name -> file text for every schema of the contract."""
    models = {"envelope": Envelope, "status": DeviceStatus, **BODIES}
    files = {}
    for name, model in sorted(models.items()):
        schema = model.model_json_schema(by_alias=True)
        schema["$id"] = f"https://homenet.invalid/schemas/v1/{name}.json"
        files[f"{name}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return files


def write(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in generate().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write(Path(sys.argv[1]) if len(sys.argv) > 1 else SCHEMA_DIR):
        print(p)
