"""Schedules and the scheduler daemon: cron fires, exactly-once submission under a fake clock,
no overlap, stale locks, restarts, missed fires, and one real `sgarc submit` child.

Runs are real child processes (a few lines of Python standing in for `sgarc submit`, which
write the same result file), so locks hold real PIDs; one test runs the real submit module
on an empty input to cover the whole path without encoding anything.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from jobs import schedule as sch
from jobs.schedule import (
    Cron,
    LocalLauncher,
    RunLock,
    ScheduleError,
    Scheduler,
    StateDir,
    add_schedule,
)

T0 = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)

# Stands in for `sgarc submit SPEC --local --result-file R`: counts its launches, waits for
# a release file when asked, then writes its result like the real one.
CHILD = textwrap.dedent("""
    import json, os, sys, time
    result, marks, release = sys.argv[1:4]
    os.makedirs(marks, exist_ok=True)
    open(os.path.join(marks, str(os.getpid())), "w").close()
    deadline = time.time() + 30
    while release != "-" and not os.path.exists(release) and time.time() < deadline:
        time.sleep(0.02)
    with open(result, "w") as f:
        json.dump({"status": "succeeded", "exit_code": 0, "run_ids": ["r1"]}, f)
""")


class Clock:
    def __init__(self, t: datetime) -> None:
        self.t = t

    def __call__(self) -> datetime:
        return self.t


@pytest.fixture
def env(tmp_path):
    spec = tmp_path / "nightly.toml"
    spec.write_text(f'[job]\ninput = "{tmp_path / "in"}"\noutput = "{tmp_path / "out"}"\n'
                    '[encode]\nmethod = "amortized"\n')
    marks, release = tmp_path / "marks", tmp_path / "release"

    def command(spec_path, result_path, wait_for_release=False):
        return [sys.executable, "-c", CHILD, result_path, str(marks),
                str(release) if wait_for_release else "-"]

    clock = Clock(T0)
    lines: list[str] = []
    state = StateDir(tmp_path / "state")
    add_schedule(state, "0 2 * * *", str(spec), tz="UTC", now=T0)

    def scheduler(blocking=False):
        launcher = LocalLauncher(lambda s, r: command(s, r, blocking))
        return Scheduler(state.root, now=clock, local=launcher, echo=lines.append)

    return SimpleNamespace(tmp=tmp_path, spec=spec, state=state, clock=clock, lines=lines,
                           scheduler=scheduler, marks=marks, release=release,
                           launches=lambda: len(list(marks.glob("*"))) if marks.exists() else 0)


# ---------------------------------------------------------------------------------------------
# Cron
# ---------------------------------------------------------------------------------------------


def test_cron_next_and_latest_fire():
    c = Cron("0 2 * * *", "UTC")
    assert c.next_after(T0) == datetime(2024, 1, 2, 2, 0, tzinfo=UTC)
    assert c.next_after(datetime(2024, 1, 2, 2, 0, tzinfo=UTC)) == datetime(2024, 1, 3, 2, 0,
                                                                            tzinfo=UTC)
    assert c.latest(datetime(2024, 1, 2, 2, 0, 30, tzinfo=UTC)) == datetime(2024, 1, 2, 2, 0,
                                                                             tzinfo=UTC)
    assert c.latest(datetime(2024, 1, 2, 1, 59, 59, tzinfo=UTC)) == datetime(2024, 1, 1, 2, 0,
                                                                              tzinfo=UTC)
    weekdays = Cron("*/30 9-10 * * mon-fri", "UTC")  # lists, ranges, steps, names
    fires, t = [], datetime(2024, 1, 5, 10, 45, tzinfo=UTC)  # a Friday
    for _ in range(3):
        t = weekdays.next_after(t)
        fires.append(t.strftime("%a %H:%M"))
    assert fires == ["Mon 09:00", "Mon 09:30", "Mon 10:00"]


def test_cron_in_a_zone_fires_once_when_clocks_fall_back():
    c = Cron("30 2 * * *", "Europe/Berlin")
    t = datetime(2024, 10, 26, 12, 0, tzinfo=UTC)
    fires = []
    for _ in range(2):
        t = c.next_after(t)
        fires.append(t.astimezone(UTC).isoformat())
    # 02:30 happens twice on 27 Oct (CEST then CET): one fire, then the next day's.
    assert fires == ["2024-10-27T00:30:00+00:00", "2024-10-28T01:30:00+00:00"]


@pytest.mark.parametrize("expr, tz, needle", [
    ("0 2 * *", "UTC", "use 5 fields"),
    ("0 0 2 * * *", "UTC", "use 5 fields"),
    ("61 2 * * *", "UTC", "not valid"),
    ("0 2 * * *", "Mars/Olympus", "unknown time zone"),
])
def test_cron_errors(expr, tz, needle):
    with pytest.raises(ScheduleError, match=needle):
        Cron(expr, tz)


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def _cli(*argv) -> int:
    parser = argparse.ArgumentParser(prog="sgarc")
    sch.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_schedule_add_list_remove(tmp_path, capsys, monkeypatch):
    spec = tmp_path / "photos.toml"
    spec.write_text('[job]\ninput = "in"\noutput = "out"\n')
    monkeypatch.setenv(sch.STATE_ENV, str(tmp_path / "home"))
    assert _cli("schedule", "add", "--cron", "0 2 * * *", str(spec), "--tz", "UTC") == 0
    assert "schedule photos:" in capsys.readouterr().out
    saved = json.loads((tmp_path / "home" / "schedules" / "photos.json").read_text())
    assert (saved["cron"], saved["spec"], saved["tz"]) == ("0 2 * * *", str(spec), "UTC")
    with pytest.raises(ScheduleError, match="exists"):
        _cli("schedule", "add", "--cron", "0 3 * * *", str(spec))
    assert _cli("schedule", "add", "--cron", "0 3 * * 0", str(spec), "--name", "weekly",
                "--state-dir", str(tmp_path / "home")) == 0
    capsys.readouterr()
    assert _cli("schedule", "list") == 0
    listing = capsys.readouterr().out
    assert "photos" in listing and "weekly" in listing and "0 3 * * 0" in listing
    assert _cli("schedule", "remove", "weekly") == 0
    with pytest.raises(ScheduleError, match=r"no schedule 'weekly'.*photos"):
        _cli("schedule", "remove", "weekly")
    with pytest.raises(ScheduleError, match="5 fields"):
        _cli("schedule", "add", "--cron", "@daily", str(spec), "--name", "x")
    bad = tmp_path / "bad.toml"
    bad.write_text("[job]\ninput = 'a'\n")
    with pytest.raises(Exception, match="output is required"):
        _cli("schedule", "add", "--cron", "0 2 * * *", str(bad))


# ---------------------------------------------------------------------------------------------
# The scheduler
# ---------------------------------------------------------------------------------------------


def test_due_schedule_is_submitted_exactly_once_per_fire(env):
    s = env.scheduler(blocking=True)
    env.clock.t = datetime(2024, 1, 2, 1, 59, tzinfo=UTC)
    assert s.tick() == []
    env.clock.t = datetime(2024, 1, 2, 2, 0, 30, tzinfo=UTC)
    assert s.tick() == [("nightly", "started")]
    assert s.tick() == []  # same fire: nothing new while it runs...
    env.release.touch()
    s.wait(poll=0.05, timeout=30)
    assert s.tick() == []  # ...nor after it ended
    env.clock.t = datetime(2024, 1, 2, 23, 0, tzinfo=UTC)
    assert s.tick() == []
    assert env.launches() == 1
    sched = env.state.get("nightly")
    assert (sched.runs, sched.last_run_status, sched.last_run_id, sched.last_exit_code) == (
        1, "succeeded", "r1", 0)
    assert sched.anchor == "2024-01-02T02:00:00+00:00"

    env.clock.t = datetime(2024, 1, 3, 2, 1, tzinfo=UTC)
    assert s.tick() == [("nightly", "started")]
    s.wait(poll=0.05, timeout=30)
    assert env.launches() == 2
    log = env.state.log_path.read_text()
    assert log == "\n".join(env.lines) + "\n"
    assert log.count("started the run of") == 2 and log.count(" succeeded") == 2
    assert all(line.startswith("2024-01-0") for line in env.lines)  # timestamped


def test_missed_fires_run_once_at_startup(env):
    env.clock.t = datetime(2024, 1, 5, 9, 0, tzinfo=UTC)  # down since Jan 1: 4 fires due
    s = env.scheduler()
    assert s.tick() == [("nightly", "started")]
    s.wait(poll=0.05, timeout=30)
    assert s.tick() == []
    assert env.launches() == 1
    assert "3 earlier fires missed" in env.lines[0]
    assert env.state.get("nightly").anchor == "2024-01-05T02:00:00+00:00"


def test_no_overlap_while_a_live_process_holds_the_lock(env):
    import os

    fd = env.state.acquire_lock("nightly")  # this process is "the run in progress"
    env.state.write_lock(fd, RunLock(kind="local", started="earlier", fire="earlier",
                                     pid=os.getpid()))
    try:
        assert env.state.acquire_lock("nightly") is None  # exclusive, even in one process
        assert env.state.lock_held("nightly")
        env.clock.t = datetime(2024, 1, 2, 2, 5, tzinfo=UTC)
        s = env.scheduler()
        assert s.tick() == [("nightly", "skipped")]
        assert s.tick() == []  # the skipped fire is handled, not retried every poll
        assert env.launches() == 0
        assert env.state.read_lock("nightly").pid == os.getpid()
        assert "still in progress" in env.lines[-1]
        assert env.state.get("nightly").last_skipped == "2024-01-02T02:00:00+00:00"
    finally:
        os.close(fd)
    assert not env.state.lock_held("nightly")  # the OS ended the lock with its holder


@pytest.mark.parametrize("stale", ["dead pid", "live pid", "garbage", "old format"])
def test_a_stale_lock_is_taken_over(env, stale):
    """A lock file nobody holds is stale whatever it says: the process that wrote it died
    (a live PID, reused or not, is no proof of a run), or it is damaged or of an older
    sgarc that recorded PID identities."""
    import os

    path = env.state.lock_path("nightly")
    path.parent.mkdir(parents=True)
    if stale == "garbage":
        path.write_text("{not json")
    else:
        p = subprocess.Popen([sys.executable, "-c", "pass"])
        p.wait()
        lock = {"kind": "local", "started": "x", "fire": "x",
                "pid": p.pid if stale == "dead pid" else os.getpid()}
        if stale == "old format":
            lock["pid_identity"] = "boot:42"
        path.write_text(json.dumps(lock))
    env.clock.t = datetime(2024, 1, 2, 2, 5, tzinfo=UTC)
    s = env.scheduler()
    assert s.tick() == [("nightly", "interrupted"), ("nightly", "started")]
    s.wait(poll=0.05, timeout=30)
    assert env.launches() == 1 and env.state.get("nightly").last_run_status == "succeeded"


def test_the_run_holds_its_lock_until_it_exits(env):
    env.clock.t = datetime(2024, 1, 2, 2, 0, tzinfo=UTC)
    s = env.scheduler(blocking=True)
    assert s.tick() == [("nightly", "started")]
    assert env.state.lock_held("nightly")  # by the child: the daemon closed its fd
    assert env.state.read_lock("nightly").pid in s.local.procs
    env.release.touch()
    s.wait(poll=0.05, timeout=30)
    assert not env.state.lock_path("nightly").exists()


def test_state_survives_a_restart(env):
    env.clock.t = datetime(2024, 1, 2, 2, 0, tzinfo=UTC)
    first = env.scheduler(blocking=True)
    assert first.tick() == [("nightly", "started")]
    pid = env.state.read_lock("nightly").pid

    # The daemon "dies"; a new one reads the state directory and finds the run going on.
    env.clock.t = datetime(2024, 1, 3, 2, 0, tzinfo=UTC)  # next night, run still going
    second = env.scheduler()
    assert second.tick() == [("nightly", "skipped")]
    assert env.state.read_lock("nightly").pid == pid

    env.release.touch()
    first.local.procs[pid].wait(30)  # (reap it here; a real dead daemon's child is init's)
    assert second.tick() == [("nightly", "succeeded")]
    third = env.scheduler()
    env.clock.t = datetime(2024, 1, 4, 2, 0, tzinfo=UTC)
    assert third.tick() == [("nightly", "started")]
    third.wait(poll=0.05, timeout=30)
    sched = env.state.get("nightly")
    assert (sched.runs, sched.last_run_status, env.launches()) == (2, "succeeded", 2)


def test_a_broken_spec_is_recorded_and_retried_at_the_next_fire(env):
    env.spec.write_text("[job]\ninput = 'a'\n")
    env.clock.t = datetime(2024, 1, 2, 2, 0, tzinfo=UTC)
    s = env.scheduler()
    assert s.tick() == [("nightly", "failed-to-start")]
    assert s.tick() == []
    sched = env.state.get("nightly")
    assert sched.last_run_status == "failed" and "output is required" in sched.last_error


def test_a_damaged_schedule_file_does_not_stop_the_others(env):
    (env.state.root / "schedules" / "bad.json").write_text("{")
    env.clock.t = datetime(2024, 1, 2, 2, 0, tzinfo=UTC)
    s = env.scheduler()
    assert s.tick() == [("nightly", "started")]
    s.wait(poll=0.05, timeout=30)
    assert any("bad.json: unreadable schedule, skipped" in line for line in env.lines)
    with pytest.raises(ScheduleError, match="unreadable"):
        env.state.schedules()


def test_cluster_schedules_go_through_the_jobs_api(env):
    env.spec.write_text(env.spec.read_text() + '[run]\naddress = "http://head:8265"\n')
    calls = SimpleNamespace(submitted=[], status="RUNNING")

    class FakeClient:
        def submit_job(self, **kw):
            calls.submitted.append(kw)
            return kw["submission_id"]

        def get_job_info(self, job_id):
            return SimpleNamespace(status=calls.status, driver_exit_code=0, message="")

    s = Scheduler(env.state.root, now=env.clock, echo=env.lines.append,
                  cluster=sch.ClusterLauncher(lambda address: FakeClient()))
    env.clock.t = datetime(2024, 1, 2, 2, 0, tzinfo=UTC)
    assert s.tick() == [("nightly", "started")]
    (kw,) = calls.submitted
    assert kw["submission_id"].startswith("sgarc-nightly-")
    assert "--local" in kw["entrypoint"] and "[job]" in kw["runtime_env"]["env_vars"][
        "SGARC_SPEC_TOML"]
    env.clock.t = datetime(2024, 1, 3, 2, 0, tzinfo=UTC)
    assert s.tick() == [("nightly", "skipped")]  # the Ray job is still RUNNING
    calls.status = "SUCCEEDED"
    assert s.tick() == [("nightly", "succeeded")]
    assert env.state.get("nightly").last_run_id == kw["submission_id"]


def test_one_daemon_per_state_dir(env):
    env.state.root.mkdir(parents=True, exist_ok=True)
    with open(env.state.root / "scheduler.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ScheduleError, match="already runs"):
            env.scheduler().run(once=True)


def test_scheduler_once_runs_the_real_submit_child(tmp_path):
    """`scheduler run --once --wait` with the real `python -m jobs.submit` child, on an
    empty input (the pipeline plans nothing, so no Ray and no encoding)."""
    (tmp_path / "in").mkdir()
    spec = tmp_path / "empty.toml"
    spec.write_text(f'[job]\ninput = "{tmp_path / "in"}"\noutput = "{tmp_path / "out"}"\n'
                    '[encode]\nmethod = "amortized"\n')
    state = tmp_path / "state"
    now = datetime.now(UTC)
    add_schedule(StateDir(state), "* * * * *", str(spec), tz="UTC",
                 now=now - timedelta(minutes=5))
    assert _cli("scheduler", "run", "--once", "--wait", "--state-dir", str(state)) == 0
    sched = StateDir(state).get("empty")
    assert sched.last_run_status == "succeeded", sched
    assert sched.last_run_id and (tmp_path / "out" / "_jobs" / sched.last_run_id).is_dir()
    log = (state / "scheduler.log").read_text()
    assert "4 earlier fires missed" in log and "succeeded" in log
    (run_log,) = (state / "logs" / "empty").glob("*.log")
    assert "encode run" in run_log.read_text()
