"""hardware/exclusive.py: one timing phase at a time per device, what else ran, timing again."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from dlas_search.hardware import exclusive
from dlas_search.hardware.exclusive import Watch, disturbed, exclusively, lock_path


@pytest.fixture
def lock_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(exclusive.LOCK_DIR_ENV, str(tmp_path / "locks"))
    return tmp_path / "locks"


def _burner():
    """A process that keeps one CPU busy until killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def test_two_processes_never_hold_the_timing_phase_at_once(lock_dir, tmp_path):
    script = textwrap.dedent("""
        import json, sys, time
        from dlas_search.hardware.exclusive import exclusively
        phases = []
        for _ in range(4):
            _, phase = exclusively("local", lambda: time.sleep(0.15), lambda v, other: None)
            phases.append((phase["timing_start"], phase["timing_end"]))
        print(json.dumps(phases))
    """)
    env = {**os.environ, exclusive.LOCK_DIR_ENV: str(lock_dir)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    phases = sorted(p for proc in procs for p in json.loads(proc.communicate(timeout=60)[0]))
    assert len(phases) == 8
    for (_, end), (start, _) in zip(phases, phases[1:]):
        assert end <= start, phases


def test_a_killed_holder_releases_the_lock(lock_dir):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from dlas_search.hardware.exclusive import timing_lock
        with timing_lock("local"):
            print("held", flush=True)
            time.sleep(60)
    """)], env={**os.environ, exclusive.LOCK_DIR_ENV: str(lock_dir)}, stdout=subprocess.PIPE,
        text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    _, phase = exclusively("local", lambda: None, lambda v, other: None)
    assert phase["timing_wait_s"] < 5
    assert lock_path("local").parent == lock_dir


def test_watch_sees_a_neighbour_burning_a_cpu():
    burner = _burner()
    try:
        with Watch() as busy:
            sum(range(20_000_000))  # ~0.5 s of this process's own work, not counted
    finally:
        burner.kill()
        burner.wait()
    assert busy.other_cpu > 0.5, busy.other_cpu  # the burner's core (whatever else runs)
    assert busy.end > busy.start


def test_a_disturbed_timing_is_timed_again_and_said():
    verdicts = iter(["noisy", "noisy", None])
    lines, values = [], iter([30.0, 20.0, 10.0])
    value, phase = exclusively("dev", lambda: next(values),
                               lambda v, other: next(verdicts), local=False, say=lines.append)
    assert value == 10.0 and phase["timing_attempts"] == 3
    assert len(lines) == 2 and "noisy" in lines[0] and "timing again (2 of at most 3)" in lines[0]


def test_after_the_last_attempt_the_quietest_is_kept(monkeypatch):
    others = iter([0.9, 0.3, 0.6])  # what the machine's other processes used, per attempt

    class Seen(Watch):
        def __exit__(self, *exc):
            super().__exit__(*exc)
            self.other_cpu = next(others)

    monkeypatch.setattr(exclusive, "Watch", Seen)
    lines, values = [], iter([30.0, 20.0, 25.0])
    value, phase = exclusively("dev", lambda: next(values), lambda v, other: f"{other} cores",
                               say=lines.append)
    assert phase["timing_attempts"] == 3 and "kept the quietest of 3 attempts" in lines[-1]
    assert value == 20.0 and phase["timing_other_cpu"] == 0.3
    assert "0.9 cores" in lines[0]


def test_disturbed_names_the_reason():
    assert disturbed({"tvm": (10.0, (9.9, 10.1))}, 0.0) is None
    assert "other processes used 0.90 cores" in disturbed({"tvm": (10.0, (9.9, 10.1))}, 0.9)
    why = disturbed({"tvm": (10.0, (8.0, 13.0)), "torch": (5.0, (4.9, 5.1))}, 0.0)
    assert why == "the median's 95% interval is wide (tvm 50% of the median; limit 10%)"


def test_a_worker_moves_off_the_timing_cpus_only_when_each_has_one(monkeypatch):
    from dlas_search.hardware import timing
    before = os.sched_getaffinity(0)
    machine = sorted(before)
    try:
        monkeypatch.setattr(timing, "MACHINE_CPUS", machine)
        assert exclusive.away_from_timing(1, len(machine)) is None  # no CPU to spare
        assert os.sched_getaffinity(0) == before
        if len(machine) >= 2:
            assert exclusive.away_from_timing(1, len(machine) - 1) == machine[1:]
            assert os.sched_getaffinity(0) == set(machine[1:])
    finally:
        os.sched_setaffinity(0, before)
