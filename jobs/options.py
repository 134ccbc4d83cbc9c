"""Command-line values shared by several `sgarc` commands, and `${ENV}` references.

``--storage-options`` may hold credentials, and a command line is visible to every user of
the machine (``ps``, /proc). So the value can stay free of secrets in two ways, as a job
spec's ``[storage] options`` can: string values may say ``${NAME}``, replaced by the
environment variable NAME (the same :func:`expand_env` as job specs), and ``@path``
reads the JSON from a file (which may use ``${NAME}`` too).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

from codec.errors import SgarcError

ENV_ANY = re.compile(r"\$\{([^}]*)\}")  # any ${...}, to name malformed references
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

STORAGE_OPTIONS_HELP = (
    "fsspec storage options as JSON, or @FILE to read the JSON from FILE; string values may "
    "say ${NAME} for the environment variable NAME, so secrets stay out of the command line "
    "(never printed)")


def expand_env(value: Any, env: Mapping[str, str], where: str,
               error: type[SgarcError] = SgarcError, path: tuple[str, ...] = ()) -> Any:
    """``value`` (JSON-like, nested) with every ``${NAME}`` in its strings replaced from
    ``env``. A variable that is not set, or a ``${...}`` that is not a variable name, is an
    ``error`` naming ``where``, the option and the variable, never a value."""
    if isinstance(value, dict):
        return {k: expand_env(v, env, where, error, (*path, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, env, where, error, (*path, str(i))) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    name = ".".join(path)
    for ref in ENV_ANY.findall(value):
        if not ENV_NAME.fullmatch(ref):
            raise error(f"{where}{name}: ${{{ref}}} is not an environment variable name")

    def sub(m: re.Match) -> str:
        if m.group(1) not in env:
            raise error(f"{where}{name} refers to ${{{m.group(1)}}}, which is not set in the "
                        "environment")
        return env[m.group(1)]

    return ENV_REF.sub(sub, value)


def parse_storage_options(text: str | None, error: type[SgarcError] = SgarcError,
                          environ: Mapping[str, str] | None = None) -> dict | None:
    """``--storage-options JSON|@FILE`` as a dict with ``${NAME}`` expanded from the
    environment (None when absent); a clear ``error`` otherwise."""
    if not text:
        return None
    source = "--storage-options"
    if text.startswith("@"):
        path = text[1:]
        source = f"--storage-options @{path}"
        try:
            with open(os.path.expanduser(path), encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise error(f"{source}: cannot read the file: "
                        f"{getattr(exc, 'strerror', None) or exc}") from None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{source} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(options, dict):
        raise error(f"{source} must be a JSON object")
    return expand_env(options, os.environ if environ is None else environ, f"{source}: ",
                      error)
