"""Job specs: one TOML file that says what to recompress, where, how, and on what.

    spec = load_spec("nightly.toml")
    summary = pipeline.run.run(spec.input_url, spec.output_url, spec.to_settings(),
                               spec.to_options(), spec.storage_options())

Each table is a pydantic model (``extra="forbid"``, strict types, bounds); every key is
optional unless marked, and an unknown key is an error that names it and lists the allowed
ones:

    [job]      name, input (required), output (required), manifest (JobTable)
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
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from codec.errors import SgarcError
from jobs.options import ENV_ANY, ENV_NAME, ENV_REF, expand_env, explain
from pipeline.settings import EncodeSettings, IterativeMethod
from pipeline.storage import IMAGE_EXTENSIONS, ObjectInfo


class SpecError(SgarcError, ValueError):
    """A job spec is invalid; the message names the file, the table and the key."""


# ---------------------------------------------------------------------------------------------
# The tables
# ---------------------------------------------------------------------------------------------


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


Text = Annotated[str, Field(pattern=r"\S")]  # a string that is not blank
# A list of strings (TOML arrays; one string is a list of one), kept as a tuple.
Texts = Annotated[tuple[Text, ...], BeforeValidator(
    lambda v: (v,) if isinstance(v, str) else tuple(v) if isinstance(v, list) else v)]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class _Tables(_Table):
    """The file's top level: its tables, each validated by its own model."""

    job: dict = {}
    storage: dict = {}
    encode: dict = {}
    policy: dict = {}
    run: dict = {}
    filters: dict = {}
    refine: dict = {}


class JobTable(_Table):
    name: Text  # names runs, schedules and cluster jobs; default: the file's name
    input: Text  # as written in the file
    output: Text
    manifest: Text | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not _NAME.fullmatch(name):
            raise ValueError(f"{name!r}: use letters, digits, '.', '_' and '-' (it names "
                             "runs, schedules and cluster jobs)")
        return name

    @model_validator(mode="after")
    def _places(self) -> JobTable:
        if self.input.rstrip("/") == self.output.rstrip("/"):
            raise ValueError(f"input and output are the same place ({self.input!r})")
        return self


class StorageTable(_Table):
    options: dict[str, Any] = {}  # fsspec options, unexpanded


class RunSpec(_Table):
    shard_size: int = Field(16, ge=1)
    actors: int | None = Field(None, ge=1)  # CPU actors
    gpus: int | None = Field(None, ge=1)  # GPU actors, one GPU each
    address: Text | None = None  # Ray Jobs API (dashboard) address; None: run here
    device: Text | None = None

    @field_validator("address")
    @classmethod
    def _jobs_api(cls, address: str | None) -> str | None:
        if address is not None and address.startswith("ray://"):
            raise ValueError(f"{address!r} is a Ray Client address; sgarc submits through "
                             "the Ray Jobs API, which listens on the dashboard port: e.g. "
                             "http://head:8265")
        if address is not None and "://" in address and not address.startswith(
                ("http://", "https://")):
            raise ValueError(f"{address!r}: use an http:// or https:// Ray dashboard "
                             "address (e.g. http://head:8265)")
        return address

    @model_validator(mode="after")
    def _actors(self) -> RunSpec:
        if self.actors is not None and self.gpus is not None:
            raise ValueError("give actors (CPU actors) or gpus (one actor per GPU), not both")
        if self.gpus is not None and self.device is not None and self.device.startswith("cpu"):
            raise ValueError(f"gpus = {self.gpus} with device = {self.device!r}")
        return self


class FilterSpec(_Table):
    """Which listed images a run considers. Empty tuples / None mean "no constraint"."""

    extensions: Texts = ()  # lower case with the dot: (".jpg", ".png")
    include: Texts = ()  # a key must match one of these (when any are given)
    exclude: Texts = ()  # and none of these
    min_bytes: int | None = Field(None, ge=0)
    max_bytes: int | None = Field(None, ge=0)

    @field_validator("extensions")
    @classmethod
    def _extensions(cls, extensions: tuple[str, ...]) -> tuple[str, ...]:
        out = tuple("." + ext.lower().lstrip(".") for ext in extensions)
        for ext, norm in zip(extensions, out, strict=True):
            if norm not in IMAGE_EXTENSIONS:
                raise ValueError(f"{ext!r} is not an image type the pipeline lists "
                                 f"(allowed: {', '.join(IMAGE_EXTENSIONS)})")
        return out

    @field_validator("include", "exclude")
    @classmethod
    def _patterns(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for p in patterns:
            try:
                _glob_regex(p)
            except ValueError as exc:
                raise ValueError(f"pattern {p!r}: {exc}") from None
        return patterns

    @model_validator(mode="after")
    def _sizes(self) -> FilterSpec:
        lo, hi = self.min_bytes, self.max_bytes
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"min_bytes ({lo}) > max_bytes ({hi})")
        return self

    @property
    def active(self) -> bool:
        return bool(self.extensions or self.include or self.exclude
                    or self.min_bytes is not None or self.max_bytes is not None)


class RefineSpec(_Table):
    """The refinement pass after the coverage pass (pipeline.run.refine consumes it)."""

    enabled: bool = False
    method: IterativeMethod = "sga"
    iterations: int = Field(EncodeSettings.model_fields["iterations"].default, ge=1)
    max_images: int | None = Field(None, ge=1)  # per run; None: every candidate


# ---------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------


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
            parts = [f"{name} {' '.join(getattr(f, name))}"
                     for name in ("extensions", "include", "exclude") if getattr(f, name)]
            parts += [f"{op} {n} B" for op, n in ((">=", f.min_bytes), ("<=", f.max_bytes))
                      if n is not None]
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
    tables = _validate(_Tables, data, source, None)
    stem = Path(source).stem if source and not source.startswith("<") else "job"
    job = _validate(JobTable, {"name": stem, **tables.job}, source, "job")
    storage = _validate(StorageTable, tables.storage, source, "storage").options
    for dotted, value in _leaves(storage, ()):
        for ref in ENV_ANY.findall(value) if isinstance(value, str) else ():
            if not ENV_NAME.fullmatch(ref):
                raise SpecError(f"{source}: [storage] options.{'.'.join(dotted)}: "
                                f"${{{ref}}} is not an environment variable name")
    spec = JobSpec(name=job.name, input=job.input, output=job.output, manifest=job.manifest,
                   storage=storage, encode=_encode(source, tables.encode, tables.policy),
                   run=_validate(RunSpec, tables.run, source, "run"),
                   filters=_validate(FilterSpec, tables.filters, source, "filters"),
                   refine=_validate(RefineSpec, tables.refine, source, "refine"),
                   source=source, base_dir=base_dir or os.getcwd(), text=text)
    _check_settings(spec)
    return spec


def _validate(model: type[BaseModel], data: dict, source: str,
              table: str | Callable[[str | None], str] | None) -> Any:
    """``data`` as ``model``, or a one-line SpecError naming the file, the table and the key.
    ``table``: the table; a function of a key that gives its table ([encode] and [policy]
    share one model); None for the file's top level, whose keys are tables."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        table_of = table if callable(table) else lambda key: table
        for e in exc.errors():
            if e["type"] == "extra_forbidden":
                _unknown(source, table_of(e["loc"][0]), e["loc"][0], model.model_fields)

        def where(loc: tuple) -> str:
            name = table_of(loc[0] if loc else None)
            if name is None:
                return f"[{loc[0]}]"
            return f"[{name}] {loc[0]}" if loc else f"[{name}]"

        raise SpecError(f"{source}: {explain(exc, where)}") from None


def _unknown(source: str, table: str | None, key: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    what = f"[{table}] " if table else "table "
    raise SpecError(f"{source}: unknown {what}key {key!r}{hint}; allowed: {', '.join(allowed)}")


def _encode(source: str, encode: dict, policy: dict) -> EncodeSettings:
    """[encode] and [policy]: the fields of EncodeSettings, by group."""
    groups = {name: info.json_schema_extra["group"]
              for name, info in EncodeSettings.model_fields.items()}
    for table, t in (("encode", encode), ("policy", policy)):
        for key in t:
            if key not in groups:
                _unknown(source, table, key, [k for k, g in groups.items() if g == table])
            if groups[key] != table:
                raise SpecError(f"{source}: [{table}] {key} belongs in [{groups[key]}]")
    return _validate(EncodeSettings, {**encode, **policy}, source,
                     lambda key: groups.get(key, "encode"))


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
    and ``min_bytes <= size <= max_bytes``. Patterns match the whole key (docs/jobs.md,
    "Filters"): ``*.png`` matches top-level files only, ``**/*.png`` any depth.
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
    """A key glob as a regex: Python 3.13's glob.translate (recursive, hidden names
    included), as fsspec backports it, so patterns mean what they mean in Python's glob."""
    from fsspec.utils import glob_translate

    if pattern.startswith("/"):
        raise ValueError("patterns are relative to the input root (no leading '/')")
    return re.compile(glob_translate(pattern))

