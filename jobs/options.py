"""Command-line values shared by several `sgarc` commands, and `${ENV}` references.

The encode settings' flags are generated from :class:`pipeline.settings.EncodeSettings`
(:func:`add_settings_options`, :func:`settings_from_args`), and a validation error of any
settings model becomes one line that names the flag or key (:func:`explain`).

``--storage-options`` may hold credentials, and a command line is visible to every user of
the machine (``ps``, /proc). So the value can stay free of secrets in two ways, as a job
spec's ``[storage] options`` can: string values may say ``${NAME}``, replaced by the
environment variable NAME (the same :func:`expand_env` as job specs), and ``@path``
reads the JSON from a file (which may use ``${NAME}`` too).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import types
from collections.abc import Callable, Mapping
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

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


# ---------------------------------------------------------------------------------------------
# Settings models on the command line, and their errors as one line
# ---------------------------------------------------------------------------------------------


def add_settings_options(parser: argparse.ArgumentParser, model: type[BaseModel] | None = None
                         ) -> None:
    """One ``--flag`` per field of ``model`` (default: EncodeSettings), its help the field's
    description. Absent flags stay absent, so the model's own defaults apply."""
    if model is None:
        from pipeline.settings import EncodeSettings
        model = EncodeSettings
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra or {}
        kind = _arg_type(info.annotation)
        default = "" if info.default is None else f" (default: {info.default})"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS,
                                  "help": (info.description + default).replace("%", "%%")}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(kind) is Literal:
            kwargs.update(choices=get_args(kind))
        else:
            kwargs.update(type=kind, metavar=extra.get("metavar"))
        parser.add_argument(_flag(name), *extra.get("flags", ()), **kwargs)


def settings_from_args(args: argparse.Namespace, model: type[BaseModel] | None = None,
                       **changes: Any) -> Any:
    """The ``model`` (default: EncodeSettings) of the flags given; a bad value is an
    SgarcError naming the flag (``--iterations: must be >= 0, got -5``)."""
    if model is None:
        from pipeline.settings import EncodeSettings
        model = EncodeSettings
    values = {name: getattr(args, name) for name in model.model_fields if hasattr(args, name)}
    try:
        return model.model_validate({**values, **changes})
    except ValidationError as exc:
        raise SgarcError(explain(exc, lambda loc: _flag(loc[0]) if loc else "")) from None


def explain(exc: ValidationError, where: Callable[[tuple], str]) -> str:
    """``exc`` as one line: each error as "WHERE: what is wrong, got VALUE", WHERE being
    ``where(loc)`` (a flag, or a spec's table and key); "" for errors of the whole model."""
    return "; ".join(_explain_one(e, where(tuple(e["loc"]))) for e in exc.errors())


def _explain_one(error: Any, where: str) -> str:
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    expected = {"int": "an integer", "float": "a number", "bool": "true or false",
                "string": "a non-empty string", "dict": "a table", "model": "a table",
                "list": "a list", "tuple": "a list"}.get(kind.split("_")[0])
    bound = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=",
             "less_than": "<"}.get(kind)
    if kind == "missing":
        return f"{where} is required"
    if bound:
        limit = next(iter(ctx.values()))
        phrase = f"must be {bound} {_number(limit)}, got {_number(value)}"
    elif kind == "literal_error":
        phrase = (f"{value!r} is not one of "
                  + ", ".join(re.findall(r"'([^']*)'", ctx.get("expected", ""))))
    elif kind == "value_error":
        phrase = str(ctx.get("error", error["msg"]))
    elif kind == "extra_forbidden":
        phrase = "unknown key"
    elif expected:
        phrase = f"expected {expected}, got {type_name(value)}"
    else:
        phrase = error["msg"]
    return f"{where}{': ' if error['loc'] else ' '}{phrase}" if where else phrase


def type_name(value: Any) -> str:
    """How a value is named in messages: "string 'high'", "boolean true", "a table"."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"string {value!r}" if len(value) < 40 else "a string"
    if isinstance(value, int | float):
        return f"number {value}"
    return {"dict": "a table", "list": "a list"}.get(type(value).__name__,
                                                     type(value).__name__)


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _arg_type(annotation: Any) -> Any:
    """``int | None`` -> int; a Literal stays a Literal (its values are the choices)."""
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    return annotation
