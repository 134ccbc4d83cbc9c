"""Command-line values shared by several `sgarc` commands."""

from __future__ import annotations

import json

from codec.errors import SgarcError


def parse_storage_options(text: str | None,
                          error: type[SgarcError] = SgarcError) -> dict | None:
    """`--storage-options JSON` as a dict (None when absent); a clear `error` otherwise."""
    if not text:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"--storage-options is not valid JSON: {exc.msg}") from None
    if not isinstance(options, dict):
        raise error("--storage-options must be a JSON object")
    return options
