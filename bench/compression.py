"""Layer 3 side by side: one model on digits under each compression technique, through the
whole pipeline (train, compress, fine-tune, compile with TVM untuned, time beside PyTorch).

Every technique starts from the same trained model (stage cache) and is fine-tuned the same
number of epochs. Prints one Markdown table: accuracy (PyTorch's model, for int8 PyTorch's
quantised model), accuracy of the compiled TVM module on the same validation images, size as
deployed, sparsity, parameters, MACs, the compiled arithmetic, and TVM / PyTorch latency
(medians of the project's timing protocol, with the standard deviation).

    python bench/compression.py [--arch resnet18] [--size 32] [--threads 1] [--images 300]
"""
from __future__ import annotations

import argparse
import tempfile

import torch

from dlas_search import hardware, pipeline
from dlas_search.cache import StageCache
from dlas_search.space import load_space

TECHNIQUES = [
    {"compress.method": "none"},
    {"compress.method": "unstructured", "compress.amount": 0.9},
    {"compress.method": "channel", "compress.ratio": 0.5},
    {"compress.method": "int8"},
    {"compress.method": "fp16"},
    {"compress.method": "unstructured+int8", "compress.amount": 0.9},
    {"compress.method": "channel+int8", "compress.ratio": 0.5},
]


def accuracies(module, executable, loader, images: int) -> tuple[float, float, float]:
    """(PyTorch accuracy, TVM accuracy, top-1 agreement) on the same first `images` validation
    images, one at a time."""
    torch_ok = tvm_ok = same = seen = 0
    with torch.no_grad():
        for batch, labels in loader:
            for x, y in zip(batch, labels):
                ours = int(hardware.run_tvm(executable, x[None]).argmax())
                theirs = int(module(x[None]).argmax())
                tvm_ok, torch_ok = tvm_ok + (ours == int(y)), torch_ok + (theirs == int(y))
                same, seen = same + (ours == theirs), seen + 1
                if seen == images:
                    return torch_ok / seen, tvm_ok / seen, same / seen
    return torch_ok / seen, tvm_ok / seen, same / seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--images", type=int, default=300,
                        help="validation images run through the compiled module")
    parser.add_argument("--cache", default=None, help="stage cache directory (default: temp)")
    args = parser.parse_args()
    space = load_space("spaces/quickstart.yaml").pin({
        "model.arch": args.arch, "data.image_size": args.size, "hw.threads": args.threads,
        "algo.conv": "direct"})
    cache = StageCache(args.cache or tempfile.mkdtemp(prefix="dlas-bench-"))
    print(f"# {args.arch} on digits {args.size}x{args.size}, trained 3 epochs, fine-tuned 1; "
          f"batch 1, {args.threads} thread(s), TVM untuned `direct`; torch {torch.__version__}\n")
    print(f"Accuracy: whole validation split (PyTorch model, as logged), then PyTorch and the "
          f"compiled TVM module on the same first {args.images} validation images, and how often "
          f"their top-1 agree.\n")
    print("| compression | accuracy | PyTorch / TVM accuracy, top-1 agreement | size_mb | "
          "sparsity | params | MACs | compiled arithmetic | TVM ms (std) | PyTorch ms (std) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for pins in TECHNIQUES:
        config = space.pin(pins).defaults()
        result = pipeline.run(config, cache)
        m = result.metrics
        torch_acc, tvm_acc, agree = accuracies(result.compressed.module, result.built.executable,
                                               result.dataset.val, args.images)
        name = config.summary().split(" ")[1]
        print(f"| {name} | {m['accuracy']:.3f} | {torch_acc:.3f} / {tvm_acc:.3f}, {agree:.3f} | "
              f"{m['size_mb']:.1f} | {m['sparsity']:.2f} | {m['params'] / 1e6:.2f} M | "
              f"{m['macs'] / 1e6:.1f} M | {result.info['arithmetic']} | "
              f"{m['latency_ms']:.1f} ({m['latency_std_ms']:.1f}) | "
              f"{m['torch_latency_ms']:.1f} ({m['torch_latency_std_ms']:.1f}) |", flush=True)


if __name__ == "__main__":
    main()
