"""Small file helpers the trainer's modules share (a leaf: it imports none of them)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_json(path: Path, setting: str = "") -> dict:
    """A JSON object from a file a user wrote or received; errors name the file (as
    ``setting=path`` when a setting named it)."""
    name = f"{setting}={path}" if setting else str(path)
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{name}: cannot read it ({exc.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{name}: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name}: expected a JSON object, got {type(value).__name__}")
    return value


def atomic_write(path: Path, data: bytes) -> None:
    """Write a file whole or not at all: a temporary file beside it, renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
