"""bench/ledger.py's bookkeeping (no builds): rows are named from run parameters, a row 15%
worse than the committed table or than the other revision (its interval above 1.15) is
flagged, and the table says what it could not build."""
from __future__ import annotations

import importlib.util
import json

from conftest import ROOT

spec = importlib.util.spec_from_file_location("bench_ledger", ROOT / "bench" / "ledger.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_rows_are_named_by_precision_primitive_format_and_tuning():
    assert bench.row_key({"compress.method": "int8", "algo.conv": "direct_nhwc",
                          "algo.format": "-", "compiler.tuner": "none"}) == \
        "int8 direct_nhwc dense untuned"
    assert bench.row_key({"compress.method": "unstructured", "algo.conv": "winograd",
                          "algo.format": "sparse", "compiler.tuner": "metaschedule"}) == \
        "fp32 winograd sparse tuned"


def _samples(ms: float, n: int = 20, spread: float = 0.01) -> list[float]:
    return [ms * (1 + spread * ((i % 5) - 2) / 2) for i in range(n)]


def test_a_row_slower_than_the_other_revision_is_flagged_first(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "DATA", tmp_path / "ledger.json")
    (tmp_path / "ledger.json").write_text(json.dumps({"ratios": {
        "fp32 direct dense untuned": 1.0, "int8 direct_nhwc dense untuned": 1.0}}))
    built = {"this tree": {"fp32 direct dense untuned": {}, "int8 direct_nhwc dense untuned": {},
                           "fp16 winograd dense untuned": {"error": "FAILED"}},
             "OLD": {"fp32 direct dense untuned": {}, "int8 direct_nhwc dense untuned": {},
                     "fp16 winograd dense untuned": {}}}
    samples = {("fp32 direct dense untuned", "this tree"): _samples(45.3),
               ("fp32 direct dense untuned", "OLD"): _samples(44.3),   # 2%: within the rule
               ("fp32 direct dense untuned", "torch"): _samples(45.0),
               ("int8 direct_nhwc dense untuned", "this tree"): _samples(41.0),
               ("int8 direct_nhwc dense untuned", "OLD"): _samples(5.0),  # 8x slower
               ("int8 direct_nhwc dense untuned", "torch"): _samples(20.0),
               ("fp16 winograd dense untuned", "OLD"): _samples(9.0)}
    rows = bench.summarise(built, samples)
    worse, summary = bench.verdict(rows, "OLD")
    assert len(worse) == 2 and all("int8 direct_nhwc" in line for line in worse)
    assert worse[0].startswith("WORSE than the committed table") and "+105%" in worse[0]
    assert worse[1].startswith("SLOWER than OLD") and "x8.20" in worse[1]
    assert "1 worse than the committed table" in summary and "1 slower than OLD" in summary
    table = bench.markdown(rows, "OLD", "a CPU", "python bench/ledger.py --against OLD")
    assert "| fp16 winograd dense untuned | n/a: FAILED |" in table
    assert "Machine: a CPU." in table


def test_no_committed_table_and_no_revision_flags_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "DATA", tmp_path / "missing.json")
    built = {"this tree": {"fp32 direct dense untuned": {}}}
    rows = bench.summarise(built, {("fp32 direct dense untuned", "this tree"): _samples(10),
                                   ("fp32 direct dense untuned", "torch"): _samples(5)})
    worse, summary = bench.verdict(rows, None)
    assert worse == [] and summary == "ledger: 1 rows; 0 worse than the committed table by >15%"
    assert rows[0]["ratio"] == 2.0
