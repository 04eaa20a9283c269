"""Side by side in one process: PyTorch eager, resnet18 winograd_nhwc with the stride-2 convs
direct (last stop's cold-tuned database) and with them as im2col_gemm_nhwc (this stop's)."""
import os, sys, time
sys.path.insert(0, "/work/main/bench")
import torch
from compiler import interleaved, spread
from dlas_search import algorithms, compiler as comp, hardware, models
from dlas_search.algorithms import CannotExpress, Plan, WinogradNHWC


class StridedDirect(WinogradNHWC):
    """winograd_nhwc as it was: every conv Winograd cannot take runs direct in NHWC."""
    def lower(self, bb, conv):
        try:
            return super().lower(bb, conv)
        except CannotExpress as why:
            raise CannotExpress(str(why)) from None


old_db, new_db, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
threads = os.cpu_count()
hw = hardware.HardwareConfig(threads=threads, repeat=10, min_repeat_ms=100)
device = hardware.resolve(hw)
torch.manual_seed(0)
model = models.create(models.ModelConfig(arch="resnet18"), 1000).eval()
example = torch.randn(1, 3, 224, 224)
ref = model(example).detach().numpy()
builds = {}
for name, lowering, db in (("stride-2 direct", StridedDirect(), old_db),
                           ("stride-2 im2col_gemm_nhwc", algorithms.WinogradNHWC(), new_db)):
    plan = Plan(lowering)
    built = comp.compile(model, example, plan, comp.CompilerConfig(
        tuner="metaschedule", trials=1, database=db, cold_weights=True), device.target)
    assert not built.tuning.new_trials and not built.tuning.untuned, (name, built.tuning.untuned)
    assert comp.max_relative_error(hardware.run_tvm(built.executable, example), ref) < 1e-3
    print(name, dict(plan.lowered), flush=True)
    builds[name] = built
timers = {"eager": lambda: hardware.time_torch(model, example, hw).median_ms}
for name, built in builds.items():
    timers[name] = lambda b=built: hardware.time_tvm(b.executable, example, hw).median_ms
times = interleaved(rounds, timers)
print(f"# {device.description}; resnet18 224x224; {rounds} interleaved rounds; "
      f"{time.strftime('%Y-%m-%d %H:%M')}\n")
print("| build | ms | / PyTorch eager |\n| --- | --- | --- |")
print(f"| PyTorch eager | {spread(times['eager'])} | 1 |")
for name in builds:
    print(f"| winograd_nhwc, cold weights, {name} | {spread(times[name])} | "
          f"{spread([t / e for t, e in zip(times[name], times['eager'])])} |")
