"""Job specs: one TOML file that says what to recompress, where, how, and on what.

    spec = load_spec("nightly.toml")
    summary = pipeline.run.run(spec.input_url, spec.output_url, spec.to_settings(),
                               spec.to_options(), spec.storage_options())

Tables and keys (every one optional unless marked; unknown keys are errors that name the
key and list the allowed ones):

    [job]      name, input (required), output (required), manifest
    [storage]  options: fsspec options; string values may say "${ENV_VAR}"
    [encode]   the fields of pipeline.settings.EncodeSettings (quality | model, method,
               iterations, lr, ...), with its bounds and defaults
    [policy]   its policy fields (min_psnr: the quality floor, dB; codec.routes)
    [run]      shard_size, actors, gpus, address (Ray Jobs API, http://head:8265), device
    [filters]  extensions, include, exclude (glob patterns on keys), min_bytes, max_bytes
    [refine]   enabled, method, iterations, max_images (RefineSpec)

Secrets stay out of the file: ``${NAME}`` in a storage option is replaced by the
environment variable NAME when the run starts (:meth:`JobSpec.storage_options`), on the
machine that runs it. ``repr`` and :meth:`JobSpec.describe` show option names, env
references and non-sensitive values only. See docs/jobs.md.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from codec.errors import SgarcError
from jobs.options import ENV_ANY, ENV_NAME, ENV_REF, expand_env, explain, type_name
from pipeline.settings import EncodeSettings, IterativeMethod
from pipeline.storage import IMAGE_EXTENSIONS, ObjectInfo


class SpecError(SgarcError, ValueError):
    """A job spec is invalid; the message names the file, the table and the key."""


# ---------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    shard_size: int = 16
    actors: int | None = None
    gpus: int | None = None  # number of GPU actors (one GPU each)
    address: str | None = None  # Ray Jobs API (dashboard) address; None: run here
    device: str | None = None


@dataclass(frozen=True)
class FilterSpec:
    """Which listed images a run considers. Empty tuples / None mean "no constraint"."""

    extensions: tuple[str, ...] = ()  # lower case with the dot: (".jpg", ".png")
    include: tuple[str, ...] = ()  # a key must match one of these (when any are given)
    exclude: tuple[str, ...] = ()  # and none of these
    min_bytes: int | None = None
    max_bytes: int | None = None

    @property
    def active(self) -> bool:
        return bool(self.extensions or self.include or self.exclude
                    or self.min_bytes is not None or self.max_bytes is not None)


class RefineSpec(BaseModel):
    """The refinement pass after the coverage pass (pipeline.run.refine consumes it)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    enabled: bool = False
    method: IterativeMethod = "sga"
    iterations: int = Field(EncodeSettings.model_fields["iterations"].default, ge=1)
    max_images: int | None = Field(None, ge=1)  # per run; None: every candidate


@dataclass(frozen=True)
class JobSpec:
    name: str
    input: str  # as written in the file
    output: str
    manifest: str | None = None
    storage: Mapping[str, Any] = field(default_factory=dict, repr=False)  # unexpanded
    encode: EncodeSettings = field(default_factory=EncodeSettings)  # [encode] and [policy]
    run: RunSpec = field(default_factory=RunSpec)
    filters: FilterSpec = field(default_factory=FilterSpec)
    refine: RefineSpec = field(default_factory=RefineSpec)
    source: str = "<spec>"  # the file it came from (for messages)
    base_dir: str = "."  # relative local paths are relative to this (the file's folder)
    text: str = field(default="", repr=False, compare=False)  # the TOML as written

    # -- where -----------------------------------------------------------------------------

    @property
    def input_url(self) -> str:
        return _resolve_path(self.input, self.base_dir)

    @property
    def output_url(self) -> str:
        return _resolve_path(self.output, self.base_dir)

    @property
    def policy(self):
        """The owner's rules (codec.routes.Policy) of both passes, from [policy]."""
        return self.encode.policy()

    # -- what the pipeline takes -------------------------------------------------------------

    def to_settings(self) -> EncodeSettings:
        """The coverage pass's settings: [encode] and [policy]."""
        return self.encode

    def refine_settings(self) -> EncodeSettings:
        """The refinement pass's settings: [encode] with [refine]'s method and iterations.

        ``lr`` goes back to the method's default: a learning rate chosen for the coverage
        method need not suit the refinement method."""
        return self.encode.replace(method=self.refine.method,
                                   iterations=self.refine.iterations, lr=None)

    def to_options(self, *, progress: bool = True, run_id: str | None = None):
        """:class:`pipeline.run.RunOptions` for a run driven from this process.

        ``address`` stays None: inside a Ray job the driver finds its cluster through
        RAY_ADDRESS; elsewhere the run uses an in-process Ray. ``[run] address`` is where
        ``sgarc submit`` sends the job, not where a local driver connects.
        """
        from pipeline.run import RunOptions

        r = self.run
        kwargs: dict[str, Any] = {}
        if self.filters.active:
            kwargs["image_filter"] = functools.partial(filter_images, filters=self.filters)
        return RunOptions(shard_size=r.shard_size,
                          actors=r.gpus if r.gpus is not None else r.actors,
                          device=r.device, manifest=self.manifest, progress=progress,
                          run_id=run_id, **kwargs)

    def storage_options(self, environ: Mapping[str, str] | None = None) -> dict:
        """The fsspec options with every ``${NAME}`` replaced from the environment.

        Call it where the run happens (the secrets live there); a missing variable is a
        :class:`SpecError` naming the option and the variable, never a value."""
        env = os.environ if environ is None else environ
        return expand_env(self.storage, env, f"{self.source}: [storage] options.", SpecError)

    # -- secrets -----------------------------------------------------------------------------

    def literal_secrets(self) -> list[str]:
        """Dotted names of sensitive-looking options whose value has no env reference:
        the file itself holds a secret."""
        return [".".join(p) for p, v in _leaves(self.storage, ())
                if isinstance(v, str) and _is_sensitive(p) and not ENV_REF.search(v)]

    def redacted_storage(self) -> dict:
        """The storage options as they may be shown: sensitive literals become '***'."""
        return _redact(self.storage, ())

    def __repr__(self) -> str:
        return (f"JobSpec(name={self.name!r}, input={self.input!r}, output={self.output!r}, "
                f"storage={self.redacted_storage()!r}, encode={self.encode!r}, "
                f"run={self.run!r}, filters={self.filters!r}, refine={self.refine!r}, "
                f"source={self.source!r})")

    def describe(self) -> str:
        """A human summary (secrets redacted), one setting per line."""
        e, r, f, rf = self.encode, self.run, self.filters, self.refine
        model = (f"model {e.model}" if e.model is not None else
                 f"quality {e.quality}" if e.quality is not None else "default model")
        inference = e.method if e.method == "amortized" else f"{e.method}, {e.iterations} it"
        lines = [
            f"job:      {self.name} ({self.source})",
            f"input:    {self.input_url}" + (f" (manifest {self.manifest})"
                                             if self.manifest else ""),
            f"output:   {self.output_url}",
            f"storage:  {_show(self.redacted_storage()) if self.storage else '(none)'}",
            f"encode:   {model}, {inference}, lr {e.lr or 'default'}, seed {e.seed}, "
            f"alpha {e.alpha}, depth {e.depth}, metadata {e.metadata}",
            f"run:      {r.address or 'here (in-process Ray)'}, shard size {r.shard_size}, "
            + (f"{r.gpus} GPU actors" if r.gpus is not None else
               f"{r.actors} actors" if r.actors is not None else "actors: auto")
            + (f", device {r.device}" if r.device else ""),
        ]
        if f.active:
            parts = []
            if f.extensions:
                parts.append("extensions " + " ".join(f.extensions))
            if f.include:
                parts.append("include " + " ".join(f.include))
            if f.exclude:
                parts.append("exclude " + " ".join(f.exclude))
            if f.min_bytes is not None:
                parts.append(f">= {f.min_bytes} B")
            if f.max_bytes is not None:
                parts.append(f"<= {f.max_bytes} B")
            lines.append("filters:  " + "; ".join(parts))
        lines.append("refine:   " + (f"{rf.method}, {rf.iterations} it, "
                                     f"{rf.max_images or 'all'} images per run"
                                     if rf.enabled else "off"))
        floor = self.policy.min_psnr
        lines.append("policy:   " + ("" if floor is None else f"PSNR >= {floor:g} dB, ")
                     + "never bigger than the source")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_spec(path: str | os.PathLike[str]) -> JobSpec:
    """Read and validate a spec file; :class:`SpecError` names what is wrong and where."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read the spec: {exc}") from None
    return parse_spec(text, source=str(path), base_dir=str(path.resolve().parent))


def parse_spec(text: str, *, source: str = "<spec>", base_dir: str | None = None) -> JobSpec:
    """Validate a spec given as TOML text (``base_dir``: for relative local paths)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{source}: not valid TOML: {exc}") from None
    v = _Validator(source)
    v.keys(data, "", _TABLES)
    for table in _TABLES:
        if table in data and not isinstance(data[table], dict):
            raise SpecError(f"{source}: [{table}] must be a table, not "
                            f"{type_name(data[table])}")

    job = data.get("job", {})
    v.keys(job, "job", ("name", "input", "output", "manifest"))
    stem = Path(source).stem if source and not source.startswith("<") else "job"
    name = v.string(job, "job", "name", default=stem)
    if not _NAME.fullmatch(name):
        raise SpecError(f"{source}: [job] name {name!r}: use letters, digits, '.', '_' and "
                        "'-' (it names runs, schedules and cluster jobs)")
    input_ = v.string(job, "job", "input", required=True)
    output = v.string(job, "job", "output", required=True)
    if input_.rstrip("/") == output.rstrip("/"):
        raise SpecError(f"{source}: [job] input and output are the same place ({input_!r})")
    manifest = v.string(job, "job", "manifest")

    storage_table = data.get("storage", {})
    v.keys(storage_table, "storage", ("options",))
    storage = storage_table.get("options", {})
    if not isinstance(storage, dict):
        raise SpecError(f"{source}: [storage] options must be a table, not "
                        f"{type_name(storage)}")
    for dotted, value in _leaves(storage, ()):
        for ref in ENV_ANY.findall(value) if isinstance(value, str) else ():
            if not ENV_NAME.fullmatch(ref):
                raise SpecError(f"{source}: [storage] options.{'.'.join(dotted)}: "
                                f"${{{ref}}} is not an environment variable name")

    encode = _encode(v, data.get("encode", {}), data.get("policy", {}))
    run = _run(v, data.get("run", {}))
    filters = _filters(v, data.get("filters", {}))
    refine = v.model(RefineSpec, data.get("refine", {}), "refine")
    spec = JobSpec(name=name, input=input_, output=output, manifest=manifest, storage=storage,
                   encode=encode, run=run, filters=filters, refine=refine,
                   source=source, base_dir=base_dir or os.getcwd(), text=text)
    _check_settings(spec)
    return spec


_TABLES = ("job", "storage", "encode", "run", "filters", "refine", "policy")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def _encode(v: _Validator, encode: dict, policy: dict) -> EncodeSettings:
    """[encode] and [policy]: the fields of EncodeSettings, by group."""
    groups = {name: info.json_schema_extra["group"]
              for name, info in EncodeSettings.model_fields.items()}
    for table, t in (("encode", encode), ("policy", policy)):
        for key in t:
            if groups.get(key, table) != table:
                raise SpecError(f"{v.source}: [{table}] {key} belongs in [{groups[key]}]")
        v.keys(t, table, [name for name, group in groups.items() if group == table])
    return v.model(EncodeSettings, {**encode, **policy}, lambda key: groups[key])


def _run(v: _Validator, t: dict) -> RunSpec:
    v.keys(t, "run", ("shard_size", "actors", "gpus", "address", "device"))
    address = v.string(t, "run", "address")
    if address is not None:
        if address.startswith("ray://"):
            raise SpecError(f"{v.source}: [run] address {address!r} is a Ray Client address; "
                            "sgarc submits through the Ray Jobs API, which listens on the "
                            "dashboard port: e.g. http://head:8265")
        if "://" in address and not address.startswith(("http://", "https://")):
            raise SpecError(f"{v.source}: [run] address {address!r}: use an http:// or "
                            "https:// Ray dashboard address (e.g. http://head:8265)")
    actors = v.integer(t, "run", "actors", minimum=1)
    gpus = v.integer(t, "run", "gpus", minimum=1)
    if actors is not None and gpus is not None:
        raise SpecError(f"{v.source}: [run] give actors (CPU actors) or gpus (one actor per "
                        "GPU), not both")
    device = v.string(t, "run", "device")
    if gpus is not None and device is not None and device.startswith("cpu"):
        raise SpecError(f"{v.source}: [run] gpus = {gpus} with device = {device!r}")
    return RunSpec(shard_size=v.integer(t, "run", "shard_size", minimum=1, default=16),
                   actors=actors, gpus=gpus, address=address, device=device)


def _filters(v: _Validator, t: dict) -> FilterSpec:
    v.keys(t, "filters", ("extensions", "include", "exclude", "min_bytes", "max_bytes"))
    exts = []
    for ext in v.strings(t, "filters", "extensions"):
        norm = "." + ext.lower().lstrip(".")
        if norm not in IMAGE_EXTENSIONS:
            raise SpecError(f"{v.source}: [filters] extensions: {ext!r} is not an image type "
                            f"the pipeline lists (allowed: {', '.join(IMAGE_EXTENSIONS)})")
        exts.append(norm)
    include = v.strings(t, "filters", "include")
    exclude = v.strings(t, "filters", "exclude")
    for key, patterns in (("include", include), ("exclude", exclude)):
        for p in patterns:
            try:
                _glob_regex(p)
            except ValueError as exc:
                raise SpecError(f"{v.source}: [filters] {key}: pattern {p!r}: {exc}") from None
    lo = v.integer(t, "filters", "min_bytes", minimum=0)
    hi = v.integer(t, "filters", "max_bytes", minimum=0)
    if lo is not None and hi is not None and lo > hi:
        raise SpecError(f"{v.source}: [filters] min_bytes ({lo}) > max_bytes ({hi})")
    return FilterSpec(tuple(exts), tuple(include), tuple(exclude), lo, hi)


def _check_settings(spec: JobSpec) -> None:
    """Let the pipeline's own validation (model lookup, method, iterations) speak, with the
    file name in front."""
    for table, make in (("encode", spec.to_settings), ("refine", spec.refine_settings)):
        if table == "refine" and not spec.refine.enabled:
            continue
        try:
            make().resolved()
        except (ValueError, SgarcError) as exc:
            raise SpecError(f"{spec.source}: [{table}] {exc}") from None


class _Validator:
    """Typed lookups that raise SpecError naming file, table and key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def _where(self, table: str, key: str) -> str:
        return f"{self.source}: [{table}] {key}" if table else f"{self.source}: {key}"

    def model(self, model: type[BaseModel], t: dict, table: str | Callable[[str], str]) -> Any:
        """``t`` validated as ``model`` (its keys already checked); ``table``: the table, or
        the table of a key."""
        try:
            return model.model_validate(t)
        except ValidationError as exc:
            def where(loc: tuple) -> str:
                name = table if isinstance(table, str) else table(loc[0]) if loc else "encode"
                return f"[{name}] {loc[0]}" if loc else f"[{name}]"
            raise SpecError(f"{self.source}: {explain(exc, where)}") from None

    def keys(self, t: dict, table: str, allowed: Iterable[str]) -> None:
        allowed = tuple(allowed)
        for key in t:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                what = f"[{table}] " if table else "table "
                raise SpecError(f"{self.source}: unknown {what}key {key!r}{hint}; allowed: "
                                f"{', '.join(allowed)}")

    def _get(self, t: dict, table: str, key: str, required: bool) -> Any:
        if key not in t:
            if required:
                raise SpecError(f"{self._where(table, key)} is required")
            return None
        return t[key]

    def string(self, t, table, key, *, required=False, default=None) -> Any:
        value = self._get(t, table, key, required)
        if value is None:
            return default
        if not isinstance(value, str) or not value.strip():
            raise SpecError(f"{self._where(table, key)}: expected a non-empty string, got "
                            f"{type_name(value)}")
        return value

    def integer(self, t, table, key, *, minimum=None, default=None) -> Any:
        value = self._get(t, table, key, False)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{self._where(table, key)}: expected an integer, got "
                            f"{type_name(value)}")
        if minimum is not None and value < minimum:
            raise SpecError(f"{self._where(table, key)}: must be >= {minimum}, got {value}")
        return value

    def strings(self, t, table, key) -> list[str]:
        value = self._get(t, table, key, False)
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
            raise SpecError(f"{self._where(table, key)}: expected a list of non-empty "
                            f"strings, got {type_name(value)}")
        return value


def _resolve_path(url: str, base_dir: str) -> str:
    """URLs stay as they are; local paths are relative to the spec's folder, ~ expanded."""
    if "://" in url:
        return url
    path = os.path.expanduser(url)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


# ---------------------------------------------------------------------------------------------
# Environment references and secrets
# ---------------------------------------------------------------------------------------------

# Same policy as pipeline.storage: values under these names may be credentials.
_SENSITIVE = re.compile(r"key|secret|token|passw|credential|auth|signature|sas|cert",
                        re.IGNORECASE)


def _leaves(value: Any, path: tuple[str, ...]) -> Iterable[tuple[tuple[str, ...], Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, (*path, str(k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, (*path, str(i)))
    else:
        yield path, value


def _is_sensitive(path: tuple[str, ...]) -> bool:
    return any(_SENSITIVE.search(p) for p in path)


def _redact(value: Any, path: tuple[str, ...]) -> Any:
    if isinstance(value, dict):
        return {k: _redact(v, (*path, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, (*path, str(i))) for i, v in enumerate(value)]
    if isinstance(value, str) and _is_sensitive(path) and not ENV_REF.search(value):
        return "***"
    return value


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return repr(value)


# ---------------------------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------------------------


def filter_images(images: list[ObjectInfo], filters: FilterSpec) -> list[ObjectInfo]:
    """The images that pass ``filters``, in their original order.

    An image passes when its extension is listed (case-insensitive; any when none are),
    its key matches an ``include`` pattern (any when none are) and no ``exclude`` pattern,
    and ``min_bytes <= size <= max_bytes``. Patterns match the whole key: ``*`` and ``?``
    stay within one path segment, ``**`` spans segments (``**/`` also matches no folder),
    ``[abc]`` is a character class. So ``*.png`` matches top-level files only and
    ``**/*.png`` matches at any depth.
    """
    if not filters.active:
        return list(images)
    include = [_glob_regex(p) for p in filters.include]
    exclude = [_glob_regex(p) for p in filters.exclude]
    exts = tuple(filters.extensions)
    out = []
    for im in images:
        if exts and not im.key.lower().endswith(exts):
            continue
        if filters.min_bytes is not None and im.size < filters.min_bytes:
            continue
        if filters.max_bytes is not None and im.size > filters.max_bytes:
            continue
        if include and not any(r.fullmatch(im.key) for r in include):
            continue
        if any(r.fullmatch(im.key) for r in exclude):
            continue
        out.append(im)
    return out


@functools.lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern:
    """A key glob as a regex: ``*`` ``?`` within a segment, ``**`` across, ``[...]``."""
    if pattern.startswith("/"):
        raise ValueError("patterns are relative to the input root (no leading '/')")
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            k = i + 1
            k += pattern[k:k + 1] == "!"
            k += pattern[k:k + 1] == "]"  # a ']' first in a class is literal
            j = pattern.find("]", k)
            if j < 0:
                raise ValueError("unclosed '['")
            body = re.sub(r"([\\\[\]])", r"\\\1", pattern[i + 1:j])  # \ [ ] literal
            if body.startswith("!"):
                body = "^/" + body[1:]  # a class never matches the separator
            elif body.startswith("^"):
                body = "\\" + body  # a literal '^', as in fnmatch
            out.append("[" + body + "]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    try:
        return re.compile("".join(out), re.DOTALL)
    except re.error as exc:
        raise ValueError(str(exc)) from None

