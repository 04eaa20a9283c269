"""Layer 6: the target registry, remote devices behind a real TVM RPC tracker and server on
127.0.0.1 (started and stopped here), cross-compilation, and the timing protocol."""
import json
import os
import shutil
import struct
import threading
import time

import pytest
import torch
import tvm
from mlflow.tracking import MlflowClient
from tvm.rpc.tracker import Tracker

from conftest import TINY_SPACE, write_space
from dlas_search import algorithms, compiler, hardware, pipeline, tuning
from dlas_search.cli import main
from dlas_search.errors import BadInput
from dlas_search.search import check_targets, run_search
from dlas_search.space import load_space

pytestmark = pytest.mark.xdist_group("rpc")  # one worker: servers and timings do not collide

KEY = "dlas-test"


def start_server(tracker_port: int, key: str) -> tvm.rpc.Server:
    """An RPC server on 127.0.0.1 registered at the tracker, once the tracker lists it free."""
    server = tvm.rpc.Server("127.0.0.1", port=9300, port_end=9500, key=key,
                            tracker_addr=("127.0.0.1", tracker_port), silent=True)
    spec = hardware.parse_rpc_url(f"rpc://127.0.0.1:{tracker_port}/{key}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if hardware.tracker_status(spec)["free"] >= 1:
                return server
        except hardware.TargetUnavailable:
            pass
        time.sleep(0.25)
    server.terminate()
    raise RuntimeError(f"RPC server with key {key} did not register in 60 s")


@pytest.fixture(scope="module")
def tracker():
    tracker = Tracker("127.0.0.1", port=9190, port_end=9390, silent=True)
    yield tracker
    tracker.terminate()


@pytest.fixture(scope="module")
def server(tracker):
    server = start_server(tracker.port, KEY)
    yield server
    server.terminate()


def rpc_url(tracker, key=KEY, **query):
    text = f"rpc://127.0.0.1:{tracker.port}/{key}"
    return text + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")


def closed_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


# --- a trial on a remote device ------------------------------------------------------------

@pytest.mark.slow  # starts a TVM RPC tracker and server
def test_trial_on_an_rpc_device_brings_the_latency_back(tracker, server, tiny_space, workdir,
                                                        cache_dir, capsys):
    url = rpc_url(tracker)
    code = main(["trial", "--space", str(tiny_space), "--set", f"hw.target={url}",
                 "--cache-dir", str(cache_dir), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["status"] == "FINISHED", out
    metrics = out["metrics"]
    assert metrics["latency_ms"] > 0 and metrics["latency_p90_ms"] >= metrics["latency_ms"]
    assert metrics["max_rel_error"] < 1e-4  # the output came back from the device and matches
    assert "torch_latency_ms" not in metrics  # PyTorch eager runs on the local CPU only
    run = MlflowClient(f"sqlite:///{workdir}/tracking/mlflow.db").get_run(out["run_id"])
    assert KEY in run.data.params["hw.target"]
    assert run.data.tags["dlas.device_key"] == KEY and run.data.tags["dlas.device_kind"] == "rpc"
    assert run.data.params["hw.cache_flush"] == "False" and run.data.params["hw.pin"] == "True"
    # the session was given back: the device is free for the next trial
    assert hardware.tracker_status(hardware.parse_rpc_url(url))["free"] == 1


@pytest.mark.slow  # starts a TVM RPC tracker and server
@pytest.mark.reliability("the RPC server killed during a measurement",
                         "that trial fails: the RPC server went away during the measurement",
                         kept="the study goes on; the next trial runs on the server once back")
def test_server_gone_mid_measurement_fails_that_trial_only(tracker, workdir, cache_dir):
    """The server dies while the first trial is being timed on it: that trial fails with the
    reason, the study goes on, and the next trial succeeds on a server that came back."""
    key = "dlas-flaky"
    servers = [start_server(tracker.port, key)]
    spec = hardware.parse_rpc_url(rpc_url(tracker, key))
    events = []

    def kill_during_first_measurement():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:  # the session is taken: the trial is measuring
            if hardware.tracker_status(spec)["free"] == 0:
                break
            time.sleep(0.1)
        time.sleep(1.5)
        servers[0].terminate()
        events.append("killed")
        servers.append(start_server(tracker.port, key))
        events.append("back")

    space = TINY_SPACE.replace("hw: {threads: 1, warmup: 1, repeat: 3, min_repeat_ms: 1}",
                               f"hw: {{target: '{rpc_url(tracker, key)}', threads: 1, "
                               "warmup: 1, repeat: 40, min_repeat_ms: 250}")
    space = space.replace("method: [none, unstructured]", "method: none")
    path = write_space(workdir, space)
    killer = threading.Thread(target=kill_during_first_measurement, daemon=True)
    killer.start()
    try:
        outcome = run_search(load_space(path), trials=2, cache_dir=str(cache_dir))
    finally:
        killer.join(timeout=120)
        for server in servers:
            server.terminate()
    assert events == ["killed", "back"]
    first, second = outcome.study.trials[:2]
    assert first.state.name == "FAIL", first.user_attrs
    assert "went away during the measurement" in first.user_attrs["error"]
    assert key in first.user_attrs["error"]
    assert second.state.name == "COMPLETE" and second.values[1] > 0


# --- what cannot run: clear errors -----------------------------------------------------------

@pytest.mark.reliability("a malformed or unknown hw.target",
                         "exit 2: the target, what is wrong with it and the allowed forms",
                         kept="nothing written (no tracking folder)")
@pytest.mark.parametrize("target,words", [
    ("nosuch", ["hw.target", "nosuch", "local", "rpc://HOST:PORT/KEY"]),
    ("rpc://127.0.0.1/k", ["not host:port"]),
    ("rpc://127.0.0.1:1/k?target=notjson", ["not JSON"]),
    ("rpc://127.0.0.1:1/k?target={\"kind\":\"nokind\"}", ["TVM rejects"]),
])
def test_malformed_target_exits_2_and_writes_nothing(tiny_space, workdir, target, words, capsys):
    assert main(["search", "--space", str(tiny_space), "--set", f"hw.target={target}"]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)
    assert sorted(p.name for p in workdir.iterdir()) == ["tiny.yaml"]


@pytest.mark.reliability("an RPC tracker that does not answer",
                         "exit 2 within seconds: no target of the space can run, the tracker "
                         "is unreachable", kept="nothing written (no tracking folder)")
def test_unreachable_tracker_exits_2_fast(tiny_space, workdir, capsys):
    start = time.monotonic()
    url = f"rpc://127.0.0.1:{closed_port()}/k"
    assert main(["search", "--space", str(tiny_space), "--set", f"hw.target={url}"]) == 2
    assert time.monotonic() - start < 30  # not TVM's 60 s of retries
    err = capsys.readouterr().err
    assert "no target of the space can run" in err and "unreachable" in err
    assert sorted(p.name for p in workdir.iterdir()) == ["tiny.yaml"]


@pytest.mark.slow  # starts a TVM RPC tracker and server
@pytest.mark.reliability("an RPC key with no registered device",
                         "exit 2: no device with that key, and the keys the tracker has",
                         kept="nothing written (no tracking folder)")
def test_key_without_devices_exits_2(tracker, server, tiny_space, workdir, capsys):
    url = rpc_url(tracker, "nobody-here")
    assert main(["trial", "--space", str(tiny_space), "--set", f"hw.target={url}"]) == 2
    err = capsys.readouterr().err
    assert "no device with key 'nobody-here'" in err and KEY in err  # names the keys there
    assert sorted(p.name for p in workdir.iterdir()) == ["tiny.yaml"]


@pytest.mark.reliability("an unreachable RPC target listed beside local",
                         "a warning at the start; that target's trials fail, the others run",
                         kept="the study goes on")
def test_unavailable_target_beside_a_good_one_fails_its_trials_only(tiny_space, capsys):
    """Validation refuses a space only when none of its targets can run; otherwise the trials
    on the missing device fail (here, run directly) and the others go on."""
    url = f"rpc://127.0.0.1:{closed_port()}/k"
    space = load_space(tiny_space).pin({"hw.target": ["local", url]})
    check_targets(space.layer_variants("hw"))  # no raise: local can run
    assert "unreachable" in capsys.readouterr().err
    config = space.pin({"hw.target": url}).defaults()
    with pytest.raises(hardware.TargetUnavailable, match="unreachable"):
        pipeline.run(config)


@pytest.mark.reliability("hw.target cuda on a machine without a GPU",
                         "exit 2: no CUDA device", kept="nothing written")
def test_cuda_without_a_gpu_is_reported_unavailable(tiny_space, workdir, capsys):
    if tvm.cuda().exist:
        pytest.skip("this machine has a GPU")
    assert "no CUDA device" in hardware.availability(hardware.BUILTIN_TARGETS["cuda"])
    with pytest.raises(hardware.TargetUnavailable, match="no CUDA device"):
        hardware.resolve(hardware.HardwareConfig(target="cuda"))
    assert main(["trial", "--space", str(tiny_space), "--set", "hw.target=cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.slow  # starts a TVM RPC tracker and server
def test_targets_lists_the_registry_with_reachability(tracker, server, workdir, capsys):
    registry = f"""\
        targets:
          board:
            device: rpc
            tracker: 127.0.0.1:{tracker.port}
            key: {KEY}
            threads: 2
            label: a test board
          absent:
            device: rpc
            tracker: 127.0.0.1:{tracker.port}
            key: absent
          offline:
            device: rpc
            tracker: 127.0.0.1:{closed_port()}
            key: k
        """
    path = write_space(workdir, TINY_SPACE + registry.replace("        targets", "targets", 1))
    assert main(["targets", "--space", str(path), "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"local", "cuda", "board", "absent", "offline"}
    assert rows["local"]["status"] == "ready" and "llvm" in rows["local"]["tvm"]
    assert rows["board"]["registered"] == 1 and rows["board"]["free"] == 1
    assert rows["board"]["status"].startswith("ready") and rows["board"]["threads"] == 2
    assert rows["absent"]["registered"] == 0 and rows["absent"]["status"].startswith("no device")
    assert "unreachable" in rows["offline"]["status"]
    assert main(["targets", "--space", str(path)]) == 0
    assert "board" in capsys.readouterr().out


@pytest.mark.parametrize("entry,words", [
    ("{device: fpga}", ["targets.x.device", "fpga", "rpc"]),
    ("{device: rpc, key: k}", ["targets.x", "tracker"]),
    ("{device: rpc, tracker: nowhere, key: k}", ["targets.x.tracker", "host:port"]),
    ("{device: local, tvm: {mtriple: x}}", ["targets.x.tvm", "kind"]),
    ("{device: local, colour: red}", ["targets.x", "colour", "label"]),
    ("{device: local, threads: 0}", ["targets.x.threads"]),
])
def test_bad_registry_entries_are_named(workdir, entry, words):
    path = write_space(workdir, TINY_SPACE + f"targets:\n  x: {entry}\n")
    with pytest.raises(BadInput) as error:
        load_space(path)
    for word in words:
        assert word in str(error.value), (word, str(error.value))


def test_registry_names_a_target_and_gives_its_threads(workdir):
    path = write_space(workdir, TINY_SPACE.replace("threads: 1, ", "") +
                       "targets:\n  two: {device: local, threads: 2, label: two threads}\n")
    config = load_space(path).pin({"hw.target": "two"}).defaults()
    device = hardware.resolve(config.hw, config.targets)
    assert device.threads == min(2, os.cpu_count()) and device.spec.label == "two threads"
    assert int(device.target.attrs["num-cores"]) == device.threads


def test_project_registry_file_loads():
    from conftest import ROOT
    space = load_space(ROOT / "spaces" / "quickstart.yaml")
    assert {"rpi4", "jetson-orin-cpu"} <= set(space.targets)
    assert space.targets["rpi4"].compiler_command() == "aarch64-linux-gnu-gcc"


# --- cross-compilation -------------------------------------------------------------------------

def _elf_machine(path) -> int:
    header = open(path, "rb").read(20)
    assert header[:4] == b"\x7fELF"
    return struct.unpack_from("<H", header, 18)[0]


def test_cross_compiles_an_aarch64_shared_library(tmp_path):
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("no aarch64 cross compiler (Debian: apt-get install gcc-aarch64-linux-gnu)")
    spec = hardware.target_spec("board", {
        "device": "rpc", "tracker": "127.0.0.1:9190", "key": "board",
        "tvm": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}})
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
    example = torch.randn(1, 3, 16, 16)
    device = hardware.Device("board", spec.tvm_target(4), 4, "test board", spec)
    built = compiler.compile(model, example, algorithms.plan(algorithms.AlgoConfig()),
                             compiler.CompilerConfig(), device.target)
    aarch64 = hardware.export_library(built.executable, device, tmp_path / "arm")
    assert _elf_machine(aarch64) == 183  # EM_AARCH64
    local = hardware.Device("local", hardware.local_target(1), 1, "here")
    native = compiler.compile(model, example, algorithms.plan(algorithms.AlgoConfig()),
                              compiler.CompilerConfig(), local.target)
    assert _elf_machine(hardware.export_library(native.executable, local, tmp_path)) == 62


def test_missing_cross_compiler_is_bad_input(workdir):
    path = write_space(workdir, TINY_SPACE + (
        "targets:\n  board:\n    device: rpc\n    tracker: 127.0.0.1:9190\n    key: b\n"
        "    cross_compiler: no-such-gcc\n"))
    config = load_space(path).pin({"hw.target": "board"}).defaults()
    with pytest.raises(BadInput, match="no-such-gcc"):
        hardware.check(config.hw, config.targets)


# --- tuning on the device the trial targets --------------------------------------------------

@pytest.mark.slow  # MetaSchedule tuning measured through a TVM RPC tracker and server
def test_metaschedule_measures_on_the_rpc_device(tracker, server, tmp_path, monkeypatch):
    def no_local_runner(*args, **kwargs):
        raise AssertionError("a remote target's candidates were measured locally")
    monkeypatch.setattr(tuning.ms.runner, "LocalRunner", no_local_runner)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU()).eval()
    example = torch.randn(1, 8, 16, 16)
    cfg = compiler.CompilerConfig(tuner="metaschedule", trials=8, database=str(tmp_path))
    built = compiler.compile(model, example, algorithms.plan(algorithms.AlgoConfig()), cfg,
                             hardware.local_target(1), measure_on=("127.0.0.1", tracker.port, KEY))
    report = built.tuning
    assert report.new_trials > 0 and not report.untuned
    assert f"-{KEY}-" in report.database.name  # records kept apart from the local CPU's
    assert report.database != tuning.target_folder(tmp_path, hardware.local_target(1))
    assert any(row["best_us"] for row in report.task_table)  # real measured times came back
    # the tuning guard timed each default and tuned schedule on the device too
    assert all(row["default_us"] and row["tuned_us"] for row in report.task_table)
    with torch.no_grad():
        reference = model(example).numpy()
    ours = hardware.run_tvm(built.executable, example)
    assert compiler.max_relative_error(ours, reference) < 1e-4


# --- the timing protocol -------------------------------------------------------------------

def test_pinning_keeps_every_thread_on_the_chosen_cpus_then_restores():
    before = os.sched_getaffinity(0)
    torch.ones(1000, 1000) @ torch.ones(1000, 1000)  # PyTorch's threads exist
    with hardware.pinned(1) as cpus:
        assert cpus == [min(before)]
        for tid in map(int, os.listdir("/proc/self/task")):
            assert os.sched_getaffinity(tid) == {min(before)}
    assert os.sched_getaffinity(0) == before
    with hardware.pinned(1, enabled=False) as cpus:
        assert cpus is None and os.sched_getaffinity(0) == before


def test_protocol_settings_shape_the_measurement():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
    example = torch.randn(1, 3, 16, 16)
    built = compiler.compile(model, example, algorithms.plan(algorithms.AlgoConfig()),
                             compiler.CompilerConfig(), hardware.local_target(1))
    for flush in (False, True):
        cfg = hardware.HardwareConfig(threads=1, warmup=1, repeat=7, min_repeat_ms=5,
                                      cache_flush=flush)
        tvm_time = hardware.time_tvm(built.executable, example, cfg)
        torch_time = hardware.time_torch(model, example, cfg)
        for timing in (tvm_time, torch_time):
            assert len(timing.repeats) == 7 and timing.median_ms > 0
            assert timing.p90_ms >= timing.median_ms and timing.std_ms >= 0
