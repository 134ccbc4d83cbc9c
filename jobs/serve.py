"""Decode on demand over HTTP: the Starlette app, its uvicorn server, Ray Serve, ``sgarc serve``.

:mod:`pipeline.decode_service` does the decoding (keys, cache, single flight, limits, typed
errors) and knows nothing of HTTP; this module maps it onto HTTP, as docs/serve.md
describes (routes, headers, status codes, the JSON errors): :func:`make_app` (the ASGI
app), :func:`make_server` / :func:`run_server` (uvicorn on a socket bound up front, so
``port=0`` has a known port), :func:`serve_deployment` / :func:`build_app` (the same app
behind ``@serve.ingress``, one service per replica) and :func:`register` (``sgarc serve``;
``python -m jobs.serve --archive URL`` runs it stand-alone).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote_to_bytes

from codec.errors import SgarcError
from jobs.options import STORAGE_OPTIONS_HELP, parse_storage_options
from pipeline.decode_service import (
    CONTENT_TYPES,
    DECODE_BYTES_PER_PIXEL,
    DEFAULT_CACHE_BYTES,
    DEFAULT_CACHE_TTL,
    DEFAULT_DECODE_BYTES,
    DEFAULT_QUEUE_TIMEOUT,
    FORMATS,
    SERVE_MAX_PIXELS,
    BadKey,
    BadRequest,
    DecodeService,
    NotFound,
    ServeError,
    public_url,
)

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from pipeline.storage import Storage

DEFAULT_CACHE_CONTROL = "private, max-age=300"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})
_NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


# ---------------------------------------------------------------------------------------------
# Request values
# ---------------------------------------------------------------------------------------------


def parse_flag(value: str, name: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise BadRequest(f"{name} must be 1 or 0, not {value!r}")


def negotiate(accept: str | None) -> str:
    """The output format for an Accept header (PNG when absent or when it names none of ours).

    Each format gets the q-value of the most specific media range that matches it
    (``image/webp`` over ``image/*`` over ``*/*``); the highest q wins, ties go in
    FORMATS order (PNG first), so a browser's ``image/webp,image/*,*/*`` gets PNG.
    """
    if not accept:
        return "png"
    ranges: dict[str, float] = {}
    for element in accept.split(","):
        media, *params = (p.strip() for p in element.split(";"))
        media = media.lower()
        if not media:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(1.0, max(0.0, float(value)))
                except ValueError:
                    q = 0.0
        ranges.setdefault(media, q)
    best, best_q = "png", 0.0
    for fmt in FORMATS:
        mime = CONTENT_TYPES[fmt]
        for candidate in ((mime, "image/jpg") if fmt == "jpeg" else (mime,)) + ("image/*", "*/*"):
            if candidate in ranges:
                q = ranges[candidate]
                break
        else:
            q = 0.0
        if q > best_q:
            best, best_q = fmt, q
    return best


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Weak comparison (RFC 9110 13.1.2) of If-None-Match against our ETag."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    ours = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == ours for tag in if_none_match.split(","))


def _header_text(text: str) -> str:
    """A header value from any text: printable ASCII only."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:500]


def _raw_key(scope: dict) -> str:
    """The key of an /images/ request, from the target as the client sent it.

    ``scope["path"]`` is already percent-decoded (``%2F`` turned into ``/``, invalid UTF-8
    replaced), so the key is decoded here, once and strictly, from ``raw_path`` (less the
    route prefix that Ray Serve puts in ``root_path``)."""
    raw = scope.get("raw_path") or quote(scope["path"], safe="/").encode("ascii")
    root = scope.get("root_path", "").encode("utf-8")
    if root and raw.startswith(root):
        raw = raw[len(root):]
    if not raw.startswith(b"/images"):  # e.g. /%69mages/...: not a path of ours as sent
        raise NotFound("no such endpoint; use /images/<key> or /healthz")
    try:
        return unquote_to_bytes(raw[len(b"/images/"):]).decode("utf-8")
    except UnicodeDecodeError:
        raise BadKey("key is not valid UTF-8 after percent-decoding") from None


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": code, "message": message, "status": status}, status,
                        headers={**_NO_STORE, **(headers or {})})


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


def make_app(service: DecodeService, cache_control: str = DEFAULT_CACHE_CONTROL) -> Starlette:
    """The ASGI app serving ``service``: ``/images/<key>`` and ``/healthz`` (module doc)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.convertors import Convertor, register_url_convertor
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    class AnyPath(Convertor):
        """Starlette's ``path``, but through a newline too (``/images/a%0Ab`` is a 400)."""

        regex = r"[\s\S]*"

        def convert(self, value: str) -> str:
            return value

        def to_string(self, value: str) -> str:
            return value

    register_url_convertor("anypath", AnyPath())

    async def image(request: Request) -> Response:
        query, headers = request.query_params, request.headers
        args = (_raw_key(request.scope), query.get("format") or negotiate(headers.get("accept")),
                query.get("quality"), parse_flag(query.get("strip", "0"), "strip"))
        r = service.cached(*args) or await run_in_threadpool(service.render_missed, *args)
        common = {"ETag": r.etag, "Cache-Control": cache_control, "Vary": "Accept"}
        if _etag_matches(headers.get("if-none-match"), r.etag):
            return Response(status_code=304, headers=common)
        name = r.key.rsplit("/", 1)[-1].rsplit(".", 1)[0] or "image"
        name += ".jpg" if r.fmt == "jpeg" else "." + r.fmt
        return Response(r.body, media_type=r.content_type, headers={
            **common, "Content-Disposition": f"inline; filename*=UTF-8''{quote(name, safe='')}",
            "X-Content-Type-Options": "nosniff", "X-Cache": r.cache,
            "X-Sgarc-Metadata": _header_text(r.metadata)})

    def health(request: Request) -> Response:  # sync: the first call loads the registry
        payload = service.health()
        return JSONResponse(payload, 200 if payload["status"] == "ok" else 503, _NO_STORE)

    async def refused(request: Request, exc: Exception) -> Response:
        if isinstance(exc, ServeError):
            return _error(exc.status, exc.code, str(exc),
                          {"Retry-After": "5"} if exc.status == 503 else None)
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            return _error(405, "method_not_allowed", f"{request.method} is not allowed here; "
                          "use GET or HEAD", {"Allow": "GET, HEAD"})
        if exc.status_code == 404:
            return _error(404, "not_found", "no such endpoint; use /images/<key> or /healthz")
        return _error(exc.status_code, "bad_request", str(exc.detail))

    async def bug(request: Request, exc: Exception) -> Response:  # uvicorn logs the traceback
        return _error(500, "internal_error", "internal error (see the server log)")

    methods = ["GET", "HEAD"]
    return Starlette(routes=[Route("/healthz", health, methods=methods),
                             Route("/images", image, methods=methods),
                             Route("/images/{key:anypath}", image, methods=methods)],
                     exception_handlers={ServeError: refused, HTTPException: refused,
                                         Exception: bug})


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------


class HttpServer:
    """uvicorn serving an app on a socket bound here, so that ``port=0`` has a known port
    (``url``, ``server_address``) before it serves; ``serve_forever()`` blocks (in a thread
    if need be) until ``shutdown()``."""

    def __init__(self, app: Any, host: str, port: int, *, quiet: bool = False) -> None:
        import logging

        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family)
        self.server_address: tuple[str, int] = self.socket.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.server_address[1]}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(
            app, lifespan="off", access_log=not quiet, timeout_keep_alive=60,
            server_header=False))
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # no start-up banner

    def serve_forever(self) -> None:
        self.uvicorn.run(sockets=[self.socket])

    def shutdown(self) -> None:
        self.uvicorn.should_exit = True


def make_server(service: DecodeService, host: str = "127.0.0.1", port: int = 0, *,
                quiet: bool = False, cache_control: str = DEFAULT_CACHE_CONTROL
                ) -> HttpServer:
    """An :class:`HttpServer` for ``service`` (``port=0``: any free port); ``quiet`` turns
    the access log off."""
    return HttpServer(make_app(service, cache_control), host, port, quiet=quiet)


def run_server(archive: str | Storage, host: str = "127.0.0.1", port: int = 8080, *,
               storage_options: dict | None = None, quiet: bool = False,
               cache_control: str = DEFAULT_CACHE_CONTROL, out=None,
               **service_options: Any) -> int:
    """Serve ``archive`` until Ctrl-C (or SIGTERM); prints the URL first. Returns 0."""
    out = out or sys.stdout
    service = DecodeService(archive, storage_options, **service_options)
    server = make_server(service, host, port, quiet=quiet, cache_control=cache_control)
    print(f"sgarc serve: {service.archive} at {server.url}/images/<key> "
          f"(health: {server.url}/healthz); Ctrl-C to stop", file=out, flush=True)
    previous = None
    if threading.current_thread() is threading.main_thread():
        # uvicorn shuts down on SIGINT / SIGTERM, then raises the signal again: SIGTERM
        # then ends here as Ctrl-C does, not as a kill.
        def on_term(signum, frame):
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, on_term)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print("sgarc serve: stopped", file=out, flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# Ray Serve
# ---------------------------------------------------------------------------------------------


def serve_deployment(archive: str, storage_options: dict | None = None, *,
                     num_replicas: int | str = 1, num_cpus: float = 1.0,
                     max_ongoing_requests: int = 8, name: str = "sgarc-decode",
                     cache_control: str = DEFAULT_CACHE_CONTROL, **service_options: Any):
    """A Ray Serve application (``Deployment.bind()``) serving ``archive`` with :func:`make_app`.

    The app is built on each replica (``@serve.ingress`` with a builder), so each has its own
    DecodeService and cache. ``num_replicas="auto"`` turns on Serve's autoscaling;
    ``service_options`` go to DecodeService (``cache_bytes``, ``max_pixels``, ``device``,
    ...). ``storage_options`` travel to the replicas inside the pickled deployment: prefer
    credentials from the environment or an instance role.
    """
    from ray import serve

    def build_replica_app() -> Starlette:
        return make_app(DecodeService(archive, storage_options, **service_options),
                        cache_control)

    deployment = serve.deployment(
        serve.ingress(build_replica_app)(), name=name, num_replicas=num_replicas,
        ray_actor_options={"num_cpus": num_cpus}, max_ongoing_requests=max_ongoing_requests)
    return deployment.bind()


def build_app(args: dict[str, str]):
    """Application builder for ``serve run jobs.serve:build_app archive=URL [replicas=N]
    [storage_options=JSON] [cache_mb=256] [max_pixels=N] [decode_mb=4096] [queue_timeout=10]
    [device=cpu] [num_cpus=1]``."""
    args = dict(args)
    if not args.get("archive"):
        raise ValueError("build_app needs archive=<URL of the archive>")
    options = parse_storage_options(args.get("storage_options"))  # JSON or @file, ${ENV}
    replicas: int | str = args.get("replicas", "1")
    replicas = replicas if replicas == "auto" else int(replicas)
    service: dict[str, Any] = {"cache_bytes": int(float(args.get("cache_mb", 256)) * (1 << 20))}
    if args.get("max_pixels"):
        service["max_pixels"] = int(args["max_pixels"])
    if args.get("decode_mb"):
        service["decode_bytes"] = int(float(args["decode_mb"]) * (1 << 20))
    if args.get("queue_timeout"):
        service["queue_timeout"] = float(args["queue_timeout"])
    if args.get("device"):
        service["device"] = args["device"]
    return serve_deployment(args["archive"], options, num_replicas=replicas,
                            num_cpus=float(args.get("num_cpus", 1)), **service)


def _run_ray_serve(args, options: dict | None, service: dict[str, Any]) -> int:
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise SgarcError(f"--ray-serve needs Ray Serve: pip install 'sgarc[serve]' ({exc})"
                         ) from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=args.address, include_dashboard=False, configure_logging=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(serve_deployment(args.archive, options, num_replicas=args.replicas,
                                   **service), name="sgarc", route_prefix="/")
        url = f"http://{args.host}:{args.port}"
        print(f"sgarc serve: {public_url(args.archive)} on Ray Serve ({args.replicas} "
              f"replica(s)) at {url}/images/<key> (health: {url}/healthz); Ctrl-C to stop",
              flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(1.0)
        print("sgarc serve: stopped", flush=True)
    finally:
        with contextlib.suppress(Exception):
            serve.delete("sgarc")
        if started:
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
    return 0


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--archive", required=True, metavar="URL",
                   help="the archive root (OUTPUT of `sgarc run`): a folder or any fsspec "
                        "URL (s3://bucket/archive, gs://..., file://...)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0: any free)")
    p.add_argument("--cache-mb", type=float, default=DEFAULT_CACHE_BYTES / (1 << 20),
                   help="memory for decoded responses, in MiB (default: 256; 0: no cache)")
    p.add_argument("--cache-ttl", type=float, default=DEFAULT_CACHE_TTL,
                   help="seconds a cached response is served before it is decoded again "
                        "(default: 600; 0: no expiry)")
    p.add_argument("--storage-options", default=None, metavar="JSON|@FILE",
                   help=f"{STORAGE_OPTIONS_HELP}, e.g. '{{\"key\": \"${{AWS_ACCESS_KEY_ID}}\", "
                        "\"client_kwargs\": {\"endpoint_url\": \"http://minio:9000\"}}'")
    p.add_argument("--max-pixels", type=int, default=SERVE_MAX_PIXELS,
                   help="refuse streams that describe larger images (422; default: "
                        f"{SERVE_MAX_PIXELS:,}, half of what `sgarc decode` allows)")
    p.add_argument("--decode-memory-mb", type=float, default=DEFAULT_DECODE_BYTES / (1 << 20),
                   help="memory the decodes in flight may need together, in MiB, estimated "
                        f"from each stream's header at {DECODE_BYTES_PER_PIXEL} bytes per "
                        "pixel (default: 4096); a request that does not fit waits")
    p.add_argument("--queue-timeout", type=float, default=DEFAULT_QUEUE_TIMEOUT,
                   help="seconds a request waits for decoding memory before it gets 503 "
                        "with Retry-After (default: 10)")
    p.add_argument("--device", default="cpu", help="torch device for synthesis (default: cpu)")
    p.add_argument("--decoders", type=int, default=None,
                   help="decodes at once (default: the CPU count, at most 4)")
    p.add_argument("--cache-control", default=DEFAULT_CACHE_CONTROL,
                   help=f"Cache-Control of image responses (default: {DEFAULT_CACHE_CONTROL!r})")
    p.add_argument("--quiet", action="store_true", help="no access log")
    p.add_argument("--ray-serve", action="store_true",
                   help="deploy on Ray Serve (needs the serve extra) instead of uvicorn in "
                        "this process")
    p.add_argument("--replicas", default=1, type=lambda v: v if v == "auto" else int(v),
                   help="Ray Serve replicas (default: 1; 'auto': autoscaling)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address for --ray-serve (default: an in-process local Ray)")


def cmd_serve(args) -> int:
    options = parse_storage_options(args.storage_options)
    if args.cache_mb < 0:
        raise SgarcError("--cache-mb must be >= 0")
    if args.max_pixels < 1:
        raise SgarcError("--max-pixels must be >= 1")
    if args.decode_memory_mb <= 0:
        raise SgarcError("--decode-memory-mb must be > 0")
    if args.queue_timeout < 0:
        raise SgarcError("--queue-timeout must be >= 0")
    service: dict[str, Any] = {"cache_bytes": int(args.cache_mb * (1 << 20)),
                               "cache_ttl": args.cache_ttl or None,
                               "max_pixels": args.max_pixels, "device": args.device,
                               "max_decodes": args.decoders,
                               "decode_bytes": max(1, int(args.decode_memory_mb * (1 << 20))),
                               "queue_timeout": args.queue_timeout}
    if args.ray_serve:
        return _run_ray_serve(args, options, {**service, "cache_control": args.cache_control})
    try:
        return run_server(args.archive, args.host, args.port, storage_options=options,
                          quiet=args.quiet, cache_control=args.cache_control, **service)
    except (ValueError, ImportError) as exc:  # a bad archive URL or an unknown protocol
        raise SgarcError(f"--archive {public_url(args.archive)}: {exc}") from None
    except OSError as exc:  # the address is in use, not ours, ...
        raise SgarcError(f"cannot listen on {args.host}:{args.port}: {exc}") from None


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``sgarc serve`` to the CLI's subparsers (``func=cmd_serve``)."""
    p = subparsers.add_parser(
        "serve", help="serve an archive's images over HTTP, decoded on demand",
        description="Serve the images of an archive written by `sgarc run`: GET "
        "/images/<source key> returns the decoded image (PNG; JPEG or WebP with ?format= or "
        "an Accept header; ?strip=1 drops EXIF / ICC / XMP), GET /healthz the server's "
        "state. Responses are cached in memory (LRU). See docs/serve.md.")
    _add_arguments(p)
    p.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.serve --archive URL ...``: the serve command on its own."""
    from jobs.cli import run_as
    return run_as("serve", argv)


if __name__ == "__main__":
    sys.exit(main())
