"""Side by side in one process: PyTorch eager and mobilenet_v2 direct_nhwc builds from
tuning databases, each tuned warm or with cold weights (no new trials)."""
import os, sys, time
sys.path.insert(0, "/work/main/bench")
import torch
from compiler import interleaved, spread
from dlas_search import algorithms, compiler as comp, hardware, models

warm_db, cold_db, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
hw = hardware.HardwareConfig(threads=os.cpu_count(), repeat=10, min_repeat_ms=100)
device = hardware.resolve(hw)
torch.manual_seed(0)
model = models.create(models.ModelConfig(arch="mobilenet_v2"), 1000).eval()
example = torch.randn(1, 3, 224, 224)
ref = model(example).detach().numpy()
builds = {}
for name, db, cold in (("tuned warm", warm_db, False), ("tuned with cold weights", cold_db, True)):
    built = comp.compile(model, example, algorithms.plan(algorithms.AlgoConfig(conv="direct_nhwc")),
                         comp.CompilerConfig(tuner="metaschedule", trials=1, database=db,
                                             cold_weights=cold), device.target)
    assert not built.tuning.new_trials and not built.tuning.untuned, name
    assert comp.max_relative_error(hardware.run_tvm(built.executable, example), ref) < 1e-3
    builds[name] = built
timers = {"eager": lambda: hardware.time_torch(model, example, hw).median_ms}
for name, built in builds.items():
    timers[name] = lambda b=built: hardware.time_tvm(b.executable, example, hw).median_ms
times = interleaved(rounds, timers)
print(f"# {device.description}; mobilenet_v2 224x224 direct_nhwc; {rounds} interleaved rounds; "
      f"{time.strftime('%Y-%m-%d %H:%M')}\n")
print("| build | ms | / PyTorch eager |\n| --- | --- | --- |")
print(f"| PyTorch eager | {spread(times['eager'])} | 1 |")
for name in builds:
    print(f"| {name} | {spread(times[name])} | "
          f"{spread([t / e for t, e in zip(times[name], times['eager'])])} |")
