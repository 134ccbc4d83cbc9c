"""Nightly runs: cron schedules of job specs and the daemon that submits them.

    sgarc schedule add --cron "0 2 * * *" nightly.toml [--name photos] [--tz Europe/Berlin]
    sgarc schedule list
    sgarc schedule remove photos
    sgarc scheduler run [--once] [--poll-seconds 30]

State lives in one directory (``$SGARC_HOME``, default ``~/.sgarc``; ``--state-dir``):

    schedules/<id>.json     the schedule and its last run (written atomically)
    locks/<id>.lock         the run in progress (PID, or Ray job id); a local run holds
                            its flock while it lives (removed when the run has ended)
    runs/<id>/<stamp>.json  a local run's outcome, written by the run itself
    logs/<id>/<stamp>.log   a local run's output
    scheduler.log           what the daemon did, one timestamped line per event
    scheduler.lock          held (flock) by the running daemon: one daemon per state dir

Semantics (docs/jobs.md has the reasons):

* A schedule is due when the latest cron fire at or before now is later than its anchor,
  the last fire it handled (initially the moment it was added). Fires are computed from
  the anchor, not from when runs happened to start, so a run's duration never shifts the
  schedule. Fires missed while the daemon was down are coalesced into one run at startup.
* Never two runs of one schedule: a fire that finds the previous run still in progress is
  skipped and logged (like Kubernetes' ``concurrencyPolicy: Forbid``). A local run's lock
  is the OS's flock, held by the run's process through an inherited fd: it ends when that
  process does, however it dies, so a lock nobody holds is stale and taken over.
* Runs outlive the daemon: local runs are child processes in their own session, and a
  restarted daemon finds them through their locks and records their outcome from the
  result file they write. Cluster runs (spec with ``[run] address``) are followed through
  the Ray Jobs API.
* Each run is incremental by construction (the pipeline skips what is done), followed by
  the refinement pass when the spec enables it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any, ClassVar

from codec.errors import SgarcError
from codec.files import atomic_write

STATE_ENV = "SGARC_HOME"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class ScheduleError(SgarcError, ValueError):
    """A schedule cannot be added, found or run; the message says why."""


def default_state_dir() -> Path:
    return Path(os.environ.get(STATE_ENV) or Path.home() / ".sgarc").expanduser()


# ---------------------------------------------------------------------------------------------
# Cron
# ---------------------------------------------------------------------------------------------


class Cron:
    """A 5-field cron expression (minute hour day-of-month month day-of-week) in a zone.

    Standard cron semantics through croniter: ``*``, lists, ranges, steps, month and day
    names; when both day fields are restricted a day matching either fires. Times are
    evaluated in ``tz`` ("local": this machine's zone, DST-aware; or an IANA name such as
    "UTC" or "Europe/Berlin"). When clocks fall back, a wall-clock time that happens twice
    fires once; when they spring forward, a time that does not exist fires at the next
    valid minute (croniter's behaviour, as in most crons).
    """

    def __init__(self, expr: str, tz: str = "local") -> None:
        from croniter import croniter

        expr = " ".join(str(expr).split())
        if len(expr.split()) != 5:
            raise ScheduleError(f"cron expression {expr!r}: use 5 fields (minute hour "
                                "day-of-month month day-of-week), e.g. \"0 2 * * *\"")
        if not croniter.is_valid(expr):
            raise ScheduleError(f"cron expression {expr!r} is not valid")
        self.expr = expr
        self.tz = tz
        self.zone = zone(tz)

    def _wall(self, dt: datetime) -> datetime:
        return dt.astimezone(self.zone).replace(tzinfo=None)

    def next_after(self, dt: datetime) -> datetime:
        """The first fire strictly after ``dt`` (aware datetimes)."""
        from croniter import croniter

        it = croniter(self.expr, dt.astimezone(self.zone))
        for _ in range(4):  # skip the repeat of a wall-clock time when clocks fall back
            fire = it.get_next(datetime)
            if self._wall(fire) != self._wall(dt):
                return fire
        return fire

    def latest(self, dt: datetime) -> datetime | None:
        """The last fire at or before ``dt``."""
        from croniter import croniter

        minute = dt.astimezone(self.zone).replace(second=0, microsecond=0)
        if croniter.match(self.expr, minute):
            return minute
        try:
            return croniter(self.expr, minute).get_prev(datetime)
        except Exception:  # an expression that never fired before (Feb 30)
            return None

    def same_fire(self, a: datetime, b: datetime) -> bool:
        """Whether two fire instants are one scheduled time (equal, or the same wall-clock
        time on both sides of a fall-back transition)."""
        return a == b or self._wall(a) == self._wall(b)


def zone(name: str) -> tzinfo:
    if name == "local":
        from dateutil.tz import tzlocal

        return tzlocal()
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"unknown time zone {name!r} (use \"local\", \"UTC\" or an IANA "
                            "name like \"Europe/Berlin\")") from None


# ---------------------------------------------------------------------------------------------
# State: schedules, locks, outcomes
# ---------------------------------------------------------------------------------------------


@dataclass
class Schedule:
    id: str
    cron: str
    spec: str  # absolute path; read at every fire, so edits apply to the next run
    tz: str = "local"
    created: str = ""
    anchor: str = ""  # the last fire handled (ISO); fires are computed from it
    runs: int = 0
    last_fire: str | None = None
    last_run_start: str | None = None
    last_run_end: str | None = None
    last_run_status: str | None = None  # running, succeeded, failed, interrupted, cancelled
    last_run_id: str | None = None  # pipeline run ids (comma separated) or the Ray job id
    last_exit_code: int | None = None
    last_error: str | None = None
    last_skipped: str | None = None  # a fire skipped because the previous run was running

    def cron_expr(self) -> Cron:
        return Cron(self.cron, self.tz)

    @classmethod
    def from_json(cls, data: bytes) -> Schedule:
        d = json.loads(data)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class RunLock:
    """The run of a schedule in progress: the content of its lock file. A local run holds
    the file's flock for as long as it lives; a cluster run lives while its Ray job does."""

    kind: str  # "local" (a child process) or "cluster" (a Ray job)
    started: str
    fire: str
    pid: int | None = None
    job_id: str | None = None
    address: str | None = None
    result: str | None = None  # the result file a local run writes
    log: str | None = None


@dataclass
class Outcome:
    status: str  # succeeded, failed, interrupted, cancelled
    exit_code: int | None = None
    run_id: str | None = None
    error: str | None = None


def flock(path: Path) -> int | None:
    """An fd holding ``path``'s exclusive flock (the file created if need be), or None when
    another open file holds it. The lock is the OS's: it ends with the last process that
    has the fd open, however that process dies, so a dead holder is never mistaken for a
    live one (nor a reused PID for it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def write_locked(fd: int, data: bytes) -> None:
    """Replace the content of a file whose flock ``fd`` holds."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


class StateDir:
    """Files of the scheduler's state directory."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        # Absolute: runs are started in their spec's folder and are given paths in here.
        self.root = (Path(root).expanduser() if root else default_state_dir()).resolve()

    def schedule_path(self, sid: str) -> Path:
        return self.root / "schedules" / f"{sid}.json"

    def lock_path(self, sid: str) -> Path:
        return self.root / "locks" / f"{sid}.lock"

    @property
    def log_path(self) -> Path:
        return self.root / "scheduler.log"

    def schedules(self, on_error: Callable[[str], None] | None = None) -> list[Schedule]:
        """All schedules; an unreadable file raises, or with ``on_error`` is reported and
        skipped (the daemon: one damaged file must not stop the other schedules)."""
        folder = self.root / "schedules"
        out = []
        for p in sorted(folder.glob("*.json")) if folder.is_dir() else ():
            try:
                out.append(Schedule.from_json(p.read_bytes()))
            except (OSError, ValueError, TypeError) as exc:
                if on_error is None:
                    raise ScheduleError(f"{p}: unreadable schedule: {exc}") from None
                on_error(f"{p}: unreadable schedule, skipped: {exc}")
        return out

    def get(self, sid: str) -> Schedule:
        p = self.schedule_path(sid)
        if not p.exists():
            known = ", ".join(s.id for s in self.schedules()) or "none"
            raise ScheduleError(f"no schedule {sid!r} in {self.root} (schedules: {known})")
        return Schedule.from_json(p.read_bytes())

    def save(self, s: Schedule) -> None:
        atomic_write(self.schedule_path(s.id), json.dumps(asdict(s), indent=1).encode())

    def lock_ids(self) -> list[str]:
        folder = self.root / "locks"
        return sorted(p.stem for p in folder.glob("*.lock")) if folder.is_dir() else []

    def read_lock(self, sid: str) -> RunLock | None:
        """The run recorded in the lock file; None when there is none (no file, or one left
        empty by a start that failed); damaged content reads as a local run, so that it is
        stale unless someone holds the file's flock."""
        try:
            data = self.lock_path(sid).read_bytes()
        except FileNotFoundError:
            return None
        if not data.strip():
            return None
        try:
            d = json.loads(data)
            return RunLock(**{k: v for k, v in d.items() if k in _LOCK_FIELDS})
        except (ValueError, TypeError):
            return RunLock(kind="local", started="", fire="")

    def acquire_lock(self, sid: str) -> int | None:
        """An fd holding the lock file's flock, or None when a live run holds it."""
        return flock(self.lock_path(sid))

    def lock_held(self, sid: str) -> bool:
        fd = self.acquire_lock(sid)
        if fd is not None:
            os.close(fd)
        return fd is None

    @staticmethod
    def write_lock(fd: int, lock: RunLock) -> None:
        write_locked(fd, json.dumps(asdict(lock), indent=1).encode())

    def remove_lock(self, sid: str) -> None:
        self.lock_path(sid).unlink(missing_ok=True)


_LOCK_FIELDS = {f.name for f in fields(RunLock)}


# ---------------------------------------------------------------------------------------------
# Launchers: start a run, tell when it ended
# ---------------------------------------------------------------------------------------------


def local_command(spec_path: str, result_path: str) -> list[str]:
    """The child that runs a spec here: ``sgarc submit SPEC --local`` as a module."""
    return [sys.executable, "-m", "jobs.submit", spec_path, "--local", "--no-progress",
            "--result-file", result_path]


class LocalLauncher:
    """Runs a spec in a child process in its own session (it survives the daemon), which
    inherits the fd that holds its schedule's lock and so holds it until it exits."""

    def __init__(self, command: Callable[[str, str], list[str]] = local_command) -> None:
        self.command = command
        self.procs: dict[int, subprocess.Popen] = {}

    def start(self, sched: Schedule, spec, state: StateDir, stamp: str, now: str,
              fire: str, lock_fd: int) -> RunLock:
        result = state.root / "runs" / sched.id / f"{stamp}.json"
        log = state.root / "logs" / sched.id / f"{stamp}.log"
        result.parent.mkdir(parents=True, exist_ok=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])  # importable without installing
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        with open(log, "ab") as out:
            proc = subprocess.Popen(self.command(sched.spec, str(result)), stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=str(Path(sched.spec).parent), env=env,
                                    start_new_session=True, pass_fds=(lock_fd,))
        self.procs[proc.pid] = proc
        return RunLock(kind="local", started=now, fire=fire, pid=proc.pid,
                       result=str(result), log=str(log))

    def poll(self, lock: RunLock) -> Outcome:
        """How a run whose lock is free ended (its exit status where it is our child)."""
        proc = self.procs.pop(lock.pid or -1, None)
        code = None
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = proc.wait(5)  # closed its lock: exiting
        return self._outcome(lock, code)

    @staticmethod
    def _outcome(lock: RunLock, code: int | None) -> Outcome:
        try:
            r = json.loads(Path(lock.result).read_bytes()) if lock.result else None
        except (OSError, ValueError):
            r = None
        if r is None:  # killed before it could write its result
            return Outcome("interrupted" if code is None or code < 0 else "failed", code,
                           error=None if code is None else f"exit status {code}, no result")
        return Outcome(r.get("status", "failed"), r.get("exit_code", code),
                       ",".join(r.get("run_ids", [])) or None, r.get("error"))


class ClusterLauncher:
    """Submits a spec through the Ray Jobs API and follows the job."""

    _STATUS: ClassVar[dict[str, str]] = {"SUCCEEDED": "succeeded", "FAILED": "failed",
                                         "STOPPED": "cancelled"}

    def __init__(self, client_factory: Callable[[str], Any] | None = None) -> None:
        from jobs.submit import job_client

        self.client = client_factory or job_client

    def start(self, sched: Schedule, spec, state: StateDir, stamp: str, now: str,
              fire: str, lock_fd: int) -> RunLock:
        from jobs.submit import new_submission_id, submit_cluster

        client = self.client(spec.run.address)
        job_id = submit_cluster(spec, spec.run.address, client=client,
                                submission_id=new_submission_id(sched.id))
        return RunLock(kind="cluster", started=now, fire=fire, job_id=job_id,
                       address=spec.run.address)

    def poll(self, lock: RunLock) -> Outcome | None:
        from jobs.submit import TERMINAL, status_value

        info = self.client(lock.address).get_job_info(lock.job_id)
        status = str(status_value(info.status))
        if status not in TERMINAL:
            return None
        return Outcome(self._STATUS[status], info.driver_exit_code, lock.job_id,
                       info.message if status != "SUCCEEDED" else None)


# ---------------------------------------------------------------------------------------------
# The scheduler
# ---------------------------------------------------------------------------------------------


class Scheduler:
    """Submits due runs of the schedules in a state directory (see the module docstring).

    ``now`` is the clock (aware datetimes; a seam for tests), ``local`` and ``cluster`` the
    launchers. Every decision is made from the files, so a new instance (a restarted
    daemon) carries on where the last one stopped.
    """

    def __init__(self, state_dir: str | os.PathLike[str] | None = None, *,
                 now: Callable[[], datetime] | None = None,
                 local: LocalLauncher | None = None, cluster: ClusterLauncher | None = None,
                 echo: Callable[[str], None] | None = None) -> None:
        self.state = StateDir(state_dir)
        self.now = now or (lambda: datetime.now(UTC))
        self.local = local or LocalLauncher()
        self._cluster = cluster
        self.echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
        self._stop = threading.Event()

    @property
    def cluster(self) -> ClusterLauncher:
        if self._cluster is None:
            self._cluster = ClusterLauncher()
        return self._cluster

    def log(self, message: str) -> None:
        line = f"{_iso(self.now())} {message}"
        self.echo(line)
        self.state.root.mkdir(parents=True, exist_ok=True)
        with open(self.state.log_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    # -- one pass ----------------------------------------------------------------------------

    def tick(self) -> list[tuple[str, str]]:
        """Record ended runs, then start due ones; the (schedule id, event) pairs."""
        events: list[tuple[str, str]] = []
        schedules = {s.id: s for s in self.state.schedules(on_error=self.log)}
        for sid in sorted(set(schedules) | set(self.state.lock_ids())):
            try:
                ended = self._reap(sid, schedules.get(sid))
                if ended:
                    events.append((sid, ended))
                if sid in schedules:
                    fired = self._maybe_fire(self.state.get(sid))
                    if fired:
                        events.append((sid, fired))
            except Exception as exc:  # one bad schedule must not stop the rest
                self.log(f"{sid}: error: {type(exc).__name__}: {exc}")
                events.append((sid, "error"))
        return events

    def _launcher(self, kind: str):
        return self.cluster if kind == "cluster" else self.local

    def _reap(self, sid: str, sched: Schedule | None) -> str | None:
        lock = self.state.read_lock(sid)
        if lock is None or (lock.kind == "local" and self.state.lock_held(sid)):
            return None
        try:
            outcome = self._launcher(lock.kind).poll(lock)
        except Exception as exc:  # cannot tell: keep the lock, never overlap
            self.log(f"{sid}: cannot check the run started {lock.started}: "
                     f"{type(exc).__name__}: {str(exc)[:200]}; keeping its lock")
            return None
        if outcome is None:
            return None
        self.state.remove_lock(sid)
        where = f"pid {lock.pid}" if lock.kind == "local" else f"Ray job {lock.job_id}"
        detail = "".join([f", exit status {outcome.exit_code}"
                          if outcome.exit_code is not None else "",
                          f", runs {outcome.run_id}" if outcome.run_id else "",
                          f": {outcome.error}" if outcome.error else ""])
        self.log(f"{sid}: run of {lock.fire} ({where}) {outcome.status}{detail}")
        if sched is not None:
            sched.last_run_end = _iso(self.now())
            sched.last_run_status = outcome.status
            sched.last_exit_code = outcome.exit_code
            sched.last_run_id = outcome.run_id or sched.last_run_id
            sched.last_error = outcome.error
            self.state.save(sched)
        return outcome.status

    def _maybe_fire(self, sched: Schedule) -> str | None:
        cron = sched.cron_expr()
        now = self.now()
        anchor = datetime.fromisoformat(sched.anchor)
        fire = cron.latest(now)
        if fire is None or fire <= anchor or cron.same_fire(fire, anchor):
            return None
        missed = self._count_between(cron, anchor, fire)
        note = (f" ({missed} earlier fire{'s' if missed > 1 else ''} missed while the "
                f"scheduler was down, coalesced into this one)" if missed else "")
        sched.anchor = sched.last_fire = _iso(fire)
        lock = self.state.read_lock(sched.id)
        if lock is not None:  # _reap left it: the previous run is still going
            sched.last_skipped = _iso(fire)
            self.state.save(sched)
            self.log(f"{sched.id}: skipped the fire of {_iso(fire)}: the run started "
                     f"{lock.started} is still in progress (never two at once){note}")
            return "skipped"
        stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        fd = self.state.acquire_lock(sched.id)
        if fd is None:  # a run took the lock since _reap looked: never two at once
            self.log(f"{sched.id}: skipped the fire of {_iso(fire)}: its lock is held{note}")
            return "skipped"
        try:
            from jobs.spec import load_spec

            spec = load_spec(sched.spec)
            kind = "cluster" if spec.run.address else "local"
            new = self._launcher(kind).start(sched, spec, self.state, stamp, _iso(now),
                                             _iso(fire), fd)
            self.state.write_lock(fd, new)
        except Exception as exc:  # recorded; the next fire tries again
            self.state.remove_lock(sched.id)
            sched.last_run_start = sched.last_run_end = _iso(now)
            sched.last_run_status, sched.last_exit_code = "failed", None
            sched.last_error = f"{type(exc).__name__}: {str(exc)[:500]}"
            self.state.save(sched)
            self.log(f"{sched.id}: could not start the run of {_iso(fire)}: "
                     f"{sched.last_error}{note}")
            return "failed-to-start"
        finally:
            os.close(fd)  # a local run's child holds the lock from here on
        sched.runs += 1
        sched.last_run_start, sched.last_run_end = _iso(now), None
        sched.last_run_status, sched.last_exit_code, sched.last_error = "running", None, None
        sched.last_run_id = new.job_id
        self.state.save(sched)
        where = (f"pid {new.pid}, log {new.log}" if new.kind == "local"
                 else f"Ray job {new.job_id} at {new.address}")
        self.log(f"{sched.id}: started the run of {_iso(fire)} ({where}){note}")
        return "started"

    @staticmethod
    def _count_between(cron: Cron, anchor: datetime, fire: datetime, cap: int = 10000) -> int:
        n, t = 0, anchor
        while n < cap:
            t = cron.next_after(t)
            if t >= fire or cron.same_fire(t, fire):
                return n
            n += 1
        return n

    # -- the daemon --------------------------------------------------------------------------

    def running(self) -> list[str]:
        return [sid for sid in self.state.lock_ids() if self.state.read_lock(sid)]

    def wait(self, poll: float = 0.5, timeout: float | None = None) -> None:
        """Tick until no run is in progress (``--once --wait``; tests)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running():
            if deadline is not None and time.monotonic() > deadline:
                raise ScheduleError(f"runs still in progress after {timeout} s: "
                                    f"{', '.join(self.running())}")
            self._stop.wait(poll)
            for sid in self.running():
                self._reap(sid, self._get(sid))

    def _get(self, sid: str) -> Schedule | None:
        try:
            return self.state.get(sid)
        except ScheduleError:
            return None

    def stop(self) -> None:
        self._stop.set()

    def run(self, *, poll_seconds: float = 30.0, once: bool = False,
            wait: bool = False) -> None:
        """Tick every ``poll_seconds`` (sooner when a fire is due) until stopped."""
        with self._daemon_lock():
            n = len(self.state.schedules(on_error=self.log))
            self.log(f"scheduler started (pid {os.getpid()}, state {self.state.root}, "
                     f"{n} schedule{'s' if n != 1 else ''})")
            handlers = self._install_signals()
            try:
                while True:
                    self.tick()
                    if once:
                        if wait:
                            self.wait()
                        break
                    if self._stop.wait(self._sleep_seconds(poll_seconds)):
                        break
            finally:
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)
                running = self.running()
                self.log("scheduler stopped" + (
                    f"; runs in progress go on and are picked up at the next start: "
                    f"{', '.join(running)}" if running and not once else ""))

    def _sleep_seconds(self, poll_seconds: float) -> float:
        now, soonest = self.now(), poll_seconds
        for s in self.state.schedules(on_error=lambda message: None):
            with contextlib.suppress(ScheduleError, ValueError):
                nxt = s.cron_expr().next_after(datetime.fromisoformat(s.anchor))
                soonest = min(soonest, (nxt - now).total_seconds() + 0.5)
        return max(0.5, soonest)

    def _install_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, lambda *_: self._stop.set())
        return old

    @contextlib.contextmanager
    def _daemon_lock(self):
        path = self.state.root / "scheduler.lock"
        fd = flock(path)
        if fd is None:
            holder = path.read_text().strip() or "another process"
            raise ScheduleError(f"a scheduler already runs on {self.state.root} ({holder})")
        try:
            write_locked(fd, f"pid {os.getpid()}\n".encode())
            yield
        finally:
            os.close(fd)


def _iso(dt: datetime) -> str:
    return dt.isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Adding, listing, removing
# ---------------------------------------------------------------------------------------------


def add_schedule(state: StateDir, cron: str, spec_path: str, *, name: str | None = None,
                 tz: str = "local", now: datetime | None = None) -> Schedule:
    from jobs.spec import load_spec

    Cron(cron, tz)  # validates both
    spec = load_spec(spec_path)
    sid = name or spec.name
    if not _ID.fullmatch(sid):
        raise ScheduleError(f"schedule name {sid!r}: use letters, digits, '.', '_' and '-'")
    if state.schedule_path(sid).exists():
        raise ScheduleError(f"schedule {sid!r} exists; remove it first or pass --name")
    now = now or datetime.now(UTC)
    sched = Schedule(id=sid, cron=" ".join(cron.split()), spec=str(Path(spec_path).resolve()),
                     tz=tz, created=_iso(now), anchor=_iso(now))
    state.save(sched)
    return sched


def remove_schedule(state: StateDir, sid: str) -> Schedule:
    sched = state.get(sid)
    state.schedule_path(sid).unlink()
    return sched


def next_fire(sched: Schedule) -> datetime:
    return sched.cron_expr().next_after(datetime.fromisoformat(sched.anchor))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def register(subparsers) -> None:
    """Add ``schedule {add,list,remove}`` and ``scheduler run`` to the sgarc parser."""
    p = subparsers.add_parser("schedule", help="cron schedules of job specs",
                              description="Schedules live in the state directory "
                              f"(${STATE_ENV}, default ~/.sgarc); `sgarc scheduler run` "
                              "submits them.")
    sub = p.add_subparsers(dest="schedule_command", required=True)
    q = sub.add_parser("add", help="schedule a spec")
    q.add_argument("spec", metavar="SPEC")
    q.add_argument("--cron", required=True, metavar="EXPR",
                   help="5-field cron expression, e.g. \"0 2 * * *\" (02:00 every day)")
    q.add_argument("--name", default=None, help="schedule id (default: the spec's job name)")
    q.add_argument("--tz", default="local",
                   help="time zone of the cron expression (default: local; or UTC, "
                   "Europe/Berlin, ...)")
    _state_arg(q)
    q.set_defaults(func=cmd_schedule_add)
    q = sub.add_parser("list", help="schedules, next fires and last runs")
    _state_arg(q)
    q.set_defaults(func=cmd_schedule_list)
    q = sub.add_parser("remove", help="remove a schedule (a run in progress goes on)")
    q.add_argument("id", metavar="ID")
    _state_arg(q)
    q.set_defaults(func=cmd_schedule_remove)

    p = subparsers.add_parser("scheduler", help="the daemon that submits scheduled runs")
    sub = p.add_subparsers(dest="scheduler_command", required=True)
    q = sub.add_parser("run", help="run the scheduler (until SIGTERM / Ctrl-C)",
                       description="Submit due runs: never two of one schedule at once; "
                       "missed fires run once at startup; state and logs in the state "
                       "directory, so a restart carries on.")
    q.add_argument("--once", action="store_true", help="one pass, then exit")
    q.add_argument("--wait", action="store_true",
                   help="with --once: wait for the runs in progress to end")
    q.add_argument("--poll-seconds", type=float, default=30.0,
                   help="how often to look (default 30)")
    _state_arg(q)
    q.set_defaults(func=cmd_scheduler_run)


def _state_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", default=None,
                   help=f"state directory (default: ${STATE_ENV} or ~/.sgarc)")


def cmd_schedule_add(args) -> int:
    state = StateDir(args.state_dir)
    sched = add_schedule(state, args.cron, args.spec, name=args.name, tz=args.tz)
    print(f"schedule {sched.id}: \"{sched.cron}\" ({sched.tz}) runs {sched.spec}; next "
          f"{_iso(next_fire(sched))}")
    print("the scheduler must be running: sgarc scheduler run" + (
        f" --state-dir {args.state_dir}" if args.state_dir else ""))
    return 0


def cmd_schedule_list(args) -> int:
    state = StateDir(args.state_dir)
    schedules = state.schedules()
    if not schedules:
        print(f"no schedules in {state.root}")
        return 0
    print(f"{'id':<20} {'cron':<16} {'tz':<14} {'next':<26} {'last run':<26} "
          f"{'status':<12} spec")
    for s in schedules:
        status = s.last_run_status or "-"
        lock = state.read_lock(s.id)
        if lock is not None:  # "ended": the scheduler records how at its next pass
            status = ("running" if lock.kind == "cluster" or state.lock_held(s.id)
                      else "ended")
        print(f"{s.id:<20} {s.cron:<16} {s.tz:<14} {_iso(next_fire(s)):<26} "
              f"{s.last_run_start or '-':<26} {status:<12} {s.spec}")
    return 0


def cmd_schedule_remove(args) -> int:
    state = StateDir(args.state_dir)
    sched = remove_schedule(state, args.id)
    running = state.read_lock(sched.id) is not None
    print(f"removed schedule {sched.id}" + (" (its run in progress goes on)" if running
                                             else ""))
    return 0


def cmd_scheduler_run(args) -> int:
    if args.wait and not args.once:
        raise ScheduleError("--wait goes with --once")
    Scheduler(args.state_dir).run(poll_seconds=args.poll_seconds, once=args.once,
                                  wait=args.wait)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.schedule schedule ...`` / ``... scheduler run`` (as ``sgarc``)."""
    from jobs.cli import main as sgarc
    return sgarc(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())

