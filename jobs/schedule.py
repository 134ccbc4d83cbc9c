"""Nightly runs: cron schedules of job specs and the daemon that submits them.

    sgarc schedule add --cron "0 2 * * *" nightly.toml [--name photos] [--tz Europe/Berlin]
    sgarc schedule list
    sgarc schedule remove photos
    sgarc scheduler run [--once [--wait]] [--poll-seconds 30]

Cron arithmetic is croniter's; the daemon is the durable part around it. State lives in one
directory (``$SGARC_HOME``, default ``~/.sgarc``; ``--state-dir``): ``schedules/<id>.json``
(the schedule, its anchor and last run), ``locks/<id>.lock`` (the run in progress; a local
run holds its flock while it lives), ``runs/`` and ``logs/`` (a local run's result and
output), ``scheduler.log`` and ``scheduler.lock`` (one daemon per state dir). A schedule is
due when its latest fire is later than its anchor (the last fire handled), so missed fires
coalesce into one run; a fire that finds the previous run in progress is skipped; runs
outlive the daemon, and a restarted one carries on from the files. docs/jobs.md ("Nightly
runs") has the semantics and their reasons; infra/ has the same schedule as a systemd timer,
a Kubernetes CronJob and a KubeRay RayCronJob, for one spec per deployment.
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
    """A 5-field cron expression evaluated by croniter in a zone ("local": this machine's,
    DST-aware; or an IANA name). A wall-clock time that happens twice when clocks fall back
    fires once; one skipped when they spring forward fires at the next valid minute."""

    def __init__(self, expr: str, tz: str = "local") -> None:
        from croniter import croniter

        expr = " ".join(str(expr).split())
        if len(expr.split()) != 5:
            raise ScheduleError(f"cron expression {expr!r}: use 5 fields (minute hour "
                                "day-of-month month day-of-week), e.g. \"0 2 * * *\"")
        if not croniter.is_valid(expr):
            raise ScheduleError(f"cron expression {expr!r} is not valid")
        self.expr, self.tz, self.zone = expr, tz, zone(tz)

    def _wall(self, dt: datetime) -> datetime:
        return dt.astimezone(self.zone).replace(tzinfo=None)

    def next_after(self, dt: datetime) -> datetime:
        """The first fire strictly after ``dt`` (aware datetimes)."""
        from croniter import croniter

        it = croniter(self.expr, dt.astimezone(self.zone))
        for _ in range(4):  # croniter fires a repeated wall-clock time twice: skip the repeat
            fire = it.get_next(datetime)
            if not self.same_fire(fire, dt):
                return fire
        return fire

    def latest(self, dt: datetime) -> datetime | None:
        """The last fire at or before ``dt``; None for one that never fired (Feb 30)."""
        from croniter import CroniterBadDateError, croniter

        minute = dt.astimezone(self.zone).replace(second=0, microsecond=0)
        if croniter.match(self.expr, minute):
            return minute
        try:
            return croniter(self.expr, minute).get_prev(datetime)
        except CroniterBadDateError:
            return None

    def same_fire(self, a: datetime, b: datetime) -> bool:
        """Equal, or one wall-clock time on both sides of a fall-back transition."""
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


def _load(cls: type, data: bytes) -> Any:
    """A dataclass from JSON, ignoring fields it does not have (older or newer files)."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in json.loads(data).items() if k in known})


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

    def next_fire(self) -> datetime:
        return self.cron_expr().next_after(datetime.fromisoformat(self.anchor))


@dataclass
class RunLock:
    """The content of a lock file: the run in progress ("local": a child process holding
    the file's flock; "cluster": a Ray job, live until the Jobs API says it ended)."""

    kind: str
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
    another open file holds it. The kernel ends the lock with the last process that has the
    fd open, however it dies, so a dead holder is never mistaken for a live one."""
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
        self.log_path = self.root / "scheduler.log"

    def schedule_path(self, sid: str) -> Path:
        return self.root / "schedules" / f"{sid}.json"

    def lock_path(self, sid: str) -> Path:
        return self.root / "locks" / f"{sid}.lock"

    def schedules(self, on_error: Callable[[str], None] | None = None) -> list[Schedule]:
        """All schedules; an unreadable file raises, or with ``on_error`` is reported and
        skipped (the daemon: one damaged file must not stop the other schedules)."""
        out = []
        for p in sorted((self.root / "schedules").glob("*.json")):
            try:
                out.append(_load(Schedule, p.read_bytes()))
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
        return _load(Schedule, p.read_bytes())

    def find(self, sid: str) -> Schedule | None:
        with contextlib.suppress(ScheduleError):
            return self.get(sid)
        return None

    def save(self, s: Schedule) -> None:
        atomic_write(self.schedule_path(s.id), json.dumps(asdict(s), indent=1).encode())

    def lock_ids(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "locks").glob("*.lock"))

    def read_lock(self, sid: str) -> RunLock | None:
        """The run recorded in the lock file; None when there is none (no file, or one left
        empty by a start that failed). Damaged content reads as a local run, stale unless
        someone holds the file's flock."""
        try:
            data = self.lock_path(sid).read_bytes()
        except FileNotFoundError:
            return None
        if not data.strip():
            return None
        try:
            return _load(RunLock, data)
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
        for folder in (result.parent, log.parent):
            folder.mkdir(parents=True, exist_ok=True)
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
        """How a run whose lock is free ended: from the result file it wrote, else from
        its exit status (where it is our child)."""
        proc = self.procs.pop(lock.pid or -1, None)
        code = None
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = proc.wait(5)  # closed its lock: exiting
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

        address = spec.run.address
        job_id = submit_cluster(spec, address, client=self.client(address),
                                submission_id=new_submission_id(sched.id))
        return RunLock(kind="cluster", started=now, fire=fire, job_id=job_id, address=address)

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

    def _launcher(self, kind: str):
        return self.cluster if kind == "cluster" else self.local

    def log(self, message: str) -> None:
        line = f"{_iso(self.now())} {message}"
        self.echo(line)
        self.state.root.mkdir(parents=True, exist_ok=True)
        with open(self.state.log_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def _record(self, sched: Schedule, **changes: Any) -> None:
        for name, value in changes.items():
            setattr(sched, name, value)
        self.state.save(sched)

    # -- one pass ----------------------------------------------------------------------------

    def tick(self) -> list[tuple[str, str]]:
        """Record ended runs, then start due ones; the (schedule id, event) pairs."""
        events: list[tuple[str, str]] = []
        schedules = {s.id: s for s in self.state.schedules(on_error=self.log)}
        for sid in sorted(set(schedules) | set(self.state.lock_ids())):
            try:
                ended = self._reap(sid, schedules.get(sid))
                fired = self._maybe_fire(self.state.get(sid)) if sid in schedules else None
                events += [(sid, event) for event in (ended, fired) if event]
            except Exception as exc:  # one bad schedule must not stop the rest
                self.log(f"{sid}: error: {type(exc).__name__}: {exc}")
                events.append((sid, "error"))
        return events

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
            self._record(sched, last_run_end=_iso(self.now()), last_run_status=outcome.status,
                         last_exit_code=outcome.exit_code, last_error=outcome.error,
                         last_run_id=outcome.run_id or sched.last_run_id)
        return outcome.status

    def _maybe_fire(self, sched: Schedule) -> str | None:
        cron, now = sched.cron_expr(), self.now()
        anchor = datetime.fromisoformat(sched.anchor)
        fire = cron.latest(now)
        if fire is None or fire <= anchor or cron.same_fire(fire, anchor):
            return None
        missed, t = 0, cron.next_after(anchor)
        while t < fire and not cron.same_fire(t, fire) and missed < 10000:
            missed, t = missed + 1, cron.next_after(t)
        note = (f" ({missed} earlier fire{'s' if missed > 1 else ''} missed while the "
                f"scheduler was down, coalesced into this one)" if missed else "")
        sched.anchor = sched.last_fire = _iso(fire)
        lock = self.state.read_lock(sched.id)
        if lock is not None:  # _reap left it: the previous run is still going
            self._record(sched, last_skipped=_iso(fire))
            self.log(f"{sched.id}: skipped the fire of {_iso(fire)}: the run started "
                     f"{lock.started} is still in progress (never two at once){note}")
            return "skipped"
        fd = self.state.acquire_lock(sched.id)
        if fd is None:  # a run took the lock since _reap looked: never two at once
            self.log(f"{sched.id}: skipped the fire of {_iso(fire)}: its lock is held{note}")
            return "skipped"
        try:
            from jobs.spec import load_spec

            spec = load_spec(sched.spec)
            stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            new = self._launcher("cluster" if spec.run.address else "local").start(
                sched, spec, self.state, stamp, _iso(now), _iso(fire), fd)
            self.state.write_lock(fd, new)
        except Exception as exc:  # recorded; the next fire tries again
            self.state.remove_lock(sched.id)
            self._record(sched, last_run_start=_iso(now), last_run_end=_iso(now),
                         last_run_status="failed", last_exit_code=None,
                         last_error=f"{type(exc).__name__}: {str(exc)[:500]}")
            self.log(f"{sched.id}: could not start the run of {_iso(fire)}: "
                     f"{sched.last_error}{note}")
            return "failed-to-start"
        finally:
            os.close(fd)  # a local run's child holds the lock from here on
        self._record(sched, runs=sched.runs + 1, last_run_start=_iso(now), last_run_end=None,
                     last_run_status="running", last_exit_code=None, last_error=None,
                     last_run_id=new.job_id)
        where = (f"pid {new.pid}, log {new.log}" if new.kind == "local"
                 else f"Ray job {new.job_id} at {new.address}")
        self.log(f"{sched.id}: started the run of {_iso(fire)} ({where}){note}")
        return "started"

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
                self._reap(sid, self.state.find(sid))

    def stop(self) -> None:
        self._stop.set()

    def run(self, *, poll_seconds: float = 30.0, once: bool = False,
            wait: bool = False) -> None:
        """Tick every ``poll_seconds`` (sooner when a fire is due) until stopped."""
        with self._daemon_lock():
            n = len(self.state.schedules(on_error=self.log))
            self.log(f"scheduler started (pid {os.getpid()}, state {self.state.root}, "
                     f"{n} schedule{'s' if n != 1 else ''})")
            old = {}
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGTERM, signal.SIGINT):
                    old[sig] = signal.signal(sig, lambda *_: self._stop.set())
            try:
                self.tick()
                while not once and not self._stop.wait(self._sleep_seconds(poll_seconds)):
                    self.tick()
                if once and wait:
                    self.wait()
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)
                running = self.running()
                self.log("scheduler stopped" + (
                    f"; runs in progress go on and are picked up at the next start: "
                    f"{', '.join(running)}" if running and not once else ""))

    def _sleep_seconds(self, poll_seconds: float) -> float:
        now, soonest = self.now(), poll_seconds
        for s in self.state.schedules(on_error=lambda message: None):
            with contextlib.suppress(ScheduleError, ValueError):
                soonest = min(soonest, (s.next_fire() - now).total_seconds() + 0.5)
        return max(0.5, soonest)

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
    spec = load_spec(spec_path)  # a spec that does not load is refused now, not at a fire
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
    add = sub.add_parser("add", help="schedule a spec")
    add.add_argument("spec", metavar="SPEC")
    add.add_argument("--cron", required=True, metavar="EXPR",
                     help="5-field cron expression, e.g. \"0 2 * * *\" (02:00 every day)")
    add.add_argument("--name", default=None,
                     help="schedule id (default: the spec's job name)")
    add.add_argument("--tz", default="local", help="time zone of the cron expression "
                     "(default: local; or UTC, Europe/Berlin, ...)")
    listing = sub.add_parser("list", help="schedules, next fires and last runs")
    remove = sub.add_parser("remove", help="remove a schedule (a run in progress goes on)")
    remove.add_argument("id", metavar="ID")

    p = subparsers.add_parser("scheduler", help="the daemon that submits scheduled runs")
    run = p.add_subparsers(dest="scheduler_command", required=True).add_parser(
        "run", help="run the scheduler (until SIGTERM / Ctrl-C)",
        description="Submit due runs: never two of one schedule at once; missed fires run "
        "once at startup; state and logs in the state directory, so a restart carries on.")
    run.add_argument("--once", action="store_true", help="one pass, then exit")
    run.add_argument("--wait", action="store_true",
                     help="with --once: wait for the runs in progress to end")
    run.add_argument("--poll-seconds", type=float, default=30.0,
                     help="how often to look (default 30)")
    for q, func in ((add, cmd_schedule_add), (listing, cmd_schedule_list),
                    (remove, cmd_schedule_remove), (run, cmd_scheduler_run)):
        q.add_argument("--state-dir", default=None,
                       help=f"state directory (default: ${STATE_ENV} or ~/.sgarc)")
        q.set_defaults(func=func)


def cmd_schedule_add(args: argparse.Namespace) -> int:
    sched = add_schedule(StateDir(args.state_dir), args.cron, args.spec, name=args.name,
                         tz=args.tz)
    print(f"schedule {sched.id}: \"{sched.cron}\" ({sched.tz}) runs {sched.spec}; next "
          f"{_iso(sched.next_fire())}")
    print("the scheduler must be running: sgarc scheduler run" + (
        f" --state-dir {args.state_dir}" if args.state_dir else ""))
    return 0


def cmd_schedule_list(args: argparse.Namespace) -> int:
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
        print(f"{s.id:<20} {s.cron:<16} {s.tz:<14} {_iso(s.next_fire()):<26} "
              f"{s.last_run_start or '-':<26} {status:<12} {s.spec}")
    return 0


def cmd_schedule_remove(args: argparse.Namespace) -> int:
    state = StateDir(args.state_dir)
    sched = remove_schedule(state, args.id)
    going = " (its run in progress goes on)" if state.read_lock(sched.id) else ""
    print(f"removed schedule {sched.id}{going}")
    return 0


def cmd_scheduler_run(args: argparse.Namespace) -> int:
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
