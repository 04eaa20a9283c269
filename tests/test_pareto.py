"""The Pareto computation against Optuna's own `best_trials`, including ties and duplicates."""
import json

import numpy as np
import optuna
import pytest

from conftest import ROOT
from dlas_search.pareto import Trials, confirmed_metrics, non_dominated, write

optuna.logging.set_verbosity(optuna.logging.WARNING)


def optuna_front(points, directions):
    study = optuna.create_study(directions=directions)
    for i, p in enumerate(points):
        study.add_trial(optuna.trial.create_trial(values=list(map(float, p)),
                                                  user_attrs={"i": i}))
    return sorted(t.user_attrs["i"] for t in study.best_trials)


HAND_MADE = [
    # accuracy (max), latency (min), size (min)
    (0.90, 10.0, 5.0),   # 0 on the front
    (0.90, 10.0, 5.0),   # 1 duplicate of 0: kept too
    (0.95, 20.0, 5.0),   # 2 on the front (more accurate, slower)
    (0.85, 10.0, 5.0),   # 3 dominated by 0 (tie on two objectives, worse on one)
    (0.80, 5.0, 9.0),    # 4 on the front (fastest)
    (0.95, 20.0, 6.0),   # 5 dominated by 2 (ties accuracy and latency)
    (0.70, 30.0, 1.0),   # 6 on the front (smallest)
    (0.70, 30.0, 2.0),   # 7 dominated by 6
]
DIRS = ["maximize", "minimize", "minimize"]


def test_hand_made_front():
    mask = non_dominated(HAND_MADE, DIRS)
    assert list(np.flatnonzero(mask)) == [0, 1, 2, 4, 6]
    assert list(np.flatnonzero(mask)) == optuna_front(HAND_MADE, DIRS)


@pytest.mark.parametrize("seed", range(20))
def test_random_fronts_match_optuna(seed):
    rng = np.random.default_rng(seed)
    n, k = rng.integers(1, 40), rng.integers(2, 4)
    points = rng.integers(0, 5, size=(n, k)).astype(float)  # few levels: many ties/duplicates
    directions = [rng.choice(["maximize", "minimize"]) for _ in range(k)]
    assert list(np.flatnonzero(non_dominated(points, directions))) == \
        optuna_front(points, directions)


def test_single_point_and_all_equal():
    assert non_dominated([(1.0, 2.0)], ["maximize", "minimize"]).tolist() == [True]
    assert non_dominated([(1.0, 2.0)] * 3, ["maximize", "minimize"]).tolist() == [True] * 3


def test_exports_parse(tmp_path):
    objectives = {"accuracy": "maximize", "latency_ms": "minimize", "size_mb": "minimize"}
    rows = [{"trial": i, "run_id": f"r{i}", "name": f"#{i}", "params": {"model.arch": "a"},
             "metrics": dict(zip(objectives, p))} for i, p in enumerate(HAND_MADE)]
    paths = write(Trials("hand", objectives, rows), tmp_path)
    data = json.loads(paths["pareto.json"].read_text())
    assert [r["trial"] for r in data["front"]] == [0, 1, 2, 4, 6]
    lines = paths["pareto.csv"].read_text().splitlines()
    assert lines[0].startswith("trial,name,accuracy,latency_ms,size_mb") and len(lines) == 6
    assert "model.arch" not in lines[0]  # one value in every trial: a constant, in the JSON
    assert data["constants"] == {"model.arch": "a"}
    assert "plotly" in paths["pareto.html"].read_text()[:200000].lower()
    assert paths["pareto.png"].read_bytes()[:4] == b"\x89PNG"


def test_html_has_every_pair_and_all_trials_by_layer(tmp_path):
    """The HTML page: a 2-D front per objective pair (the pair's own front: trial 4 is on the
    accuracy-latency front, trial 6 is not) and a parallel-coordinates view of all trials
    whose colour can follow any parameter that varied, layers in stack order."""
    import re
    objectives = {"accuracy": "maximize", "latency_ms": "minimize", "size_mb": "minimize"}
    rows = [{"trial": i, "run_id": f"r{i}", "name": f"#{i}",
             "params": {"model.arch": "ab"[i % 2], "compress.amount": str(0.1 * i),
                        "hw.threads": "1"},
             "metrics": dict(zip(objectives, p))} for i, p in enumerate(HAND_MADE)]
    html = write(Trials("hand", objectives, rows), tmp_path)["pareto.html"].read_text()
    for x, y in (("accuracy", "latency_ms"), ("accuracy", "size_mb"),
                 ("latency_ms", "size_mb")):
        assert f"{x} vs {y}" in html
    from dlas_search import plots
    figure = plots.pairs_figure(Trials("hand", objectives, rows))
    fronts = [t for t in figure.data if t.name == plots.FRONT_LEGEND]
    assert len(fronts) == 3  # the real front, the same five trials in every panel
    assert all(sorted(t.text) == ["#0", "#1", "#2", "#4", "#6"] for t in fronts)
    pairs = [t for t in figure.data if t.name == plots.PAIR_LEGEND]
    assert len(pairs) == 3 and all(t.line.dash == "dash" and t.mode == "lines" for t in pairs)
    # the accuracy-latency pair's own front: 4, 0 (=1), 2; trial 6 is on the real front only
    assert sorted(set(zip(pairs[0].x, pairs[0].y))) == [(0.8, 5.0), (0.9, 10.0), (0.95, 20.0)]
    assert '"type":"parcoords"' in html
    menu = re.findall(r'"label":"colour by ([a-z._]+)"', html)
    assert menu == ["model.arch", "compress.amount", *objectives]  # stack order, objectives
    assert html.count("<script") >= 2 and html.lower().count("plotly.js") >= 1


@pytest.mark.parametrize("seed", range(10))
def test_hypervolume_matches_optuna(seed):
    from optuna._hypervolume import compute_hypervolume

    from dlas_search.pareto import hypervolume
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 4))
    points = rng.integers(0, 6, size=(int(rng.integers(1, 25)), k)).astype(float) / 5
    reference = np.full(k, 1.1)
    front = points[non_dominated(points, ["minimize"] * k)]
    assert hypervolume(points, reference) == pytest.approx(
        compute_hypervolume(np.unique(front, axis=0), reference))


def test_export_reports_hypervolume_and_layer_importance(tmp_path):
    """latency is decided by algo.conv alone, accuracy by compress.method alone: the
    importance table must say so, per objective and per layer."""
    rng = np.random.default_rng(0)
    objectives = {"accuracy": "maximize", "latency_ms": "minimize"}
    rows = []
    for i in range(40):
        conv, method = rng.choice(["direct", "winograd"]), rng.choice(["none", "int8"])
        rows.append({"trial": i, "run_id": f"r{i}", "name": f"#{i}",
                     "params": {"algo.conv": conv, "compress.method": method},
                     "metrics": {"accuracy": (0.9 if method == "none" else 0.7)
                                 + rng.normal(0, 0.005),
                                 "latency_ms": (10.0 if conv == "direct" else 4.0)
                                 + rng.normal(0, 0.05)}})
    trials = Trials("hand", objectives, rows)
    paths = write(trials, tmp_path)
    data = json.loads(paths["pareto.json"].read_text())
    assert 0 < data["hypervolume"] <= 1.1 ** 2
    lines = paths["importance.csv"].read_text().splitlines()
    assert lines[0] == "layer,parameter,accuracy,latency_ms,trials,reliable"
    assert all(line.endswith(",40,True") for line in lines[1:])  # 40 trials: reliable
    assert data["importance"]["reliable"] is True
    table = {tuple(line.split(",")[:2]): list(map(float, line.split(",")[2:4]))
             for line in lines[1:]}
    assert table[("compress", "compress.method")][0] > 0.9  # accuracy
    assert table[("algo", "algo.conv")][1] > 0.9            # latency
    assert table[("algo", "*")] == table[("algo", "algo.conv")]


def test_importance_survives_objectives_that_do_not_vary(tmp_path):
    """Two trials with the same size (fANOVA finds no variance): the export still completes;
    size gets no importance, latency does."""
    objectives = {"latency_ms": "minimize", "size_mb": "minimize"}
    rows = [{"trial": i, "run_id": f"r{i}", "name": f"#{i}", "params": {"algo.conv": conv},
             "metrics": {"latency_ms": latency, "size_mb": 1.0}}
            for i, (conv, latency) in enumerate([("direct", 5.0), ("winograd", 3.0)])]
    paths = write(Trials("hand", objectives, rows), tmp_path)
    assert json.loads(paths["pareto.json"].read_text())["front"]
    lines = paths["importance.csv"].read_text().splitlines()
    assert lines[1].split(",")[2] == "1.0000" and lines[1].split(",")[3] == "0.0000"


# --- the accuracy floor: infeasible trials shown greyed, never on the front -------------------

FLOORED = [  # accuracy (max), latency (min), size (min), with thresholds accuracy >= 0.5
    (0.90, 10.0, 5.0),   # 0 on the front
    (0.80, 5.0, 9.0),    # 1 on the front (fastest feasible)
    (0.10, 4.0, 0.5),    # 2 at chance: fastest and smallest, but below the floor
    (0.70, 30.0, 1.0),   # 3 on the front (smallest feasible)
]


def floored_trials() -> Trials:
    objectives = {"accuracy": "maximize", "latency_ms": "minimize", "size_mb": "minimize"}
    rows = [{"trial": i, "run_id": f"r{i}", "name": f"#{i} model{i}",
             "params": {"compress.amount": str(0.3 * i)},
             "metrics": dict(zip(objectives, p))} for i, p in enumerate(FLOORED)]
    return Trials("floored", objectives, rows, {"accuracy": {"min": 0.5}})


def test_a_trial_below_the_floor_is_listed_greyed_never_on_the_front(tmp_path):
    """Trial 2 (accuracy 0.10) would dominate on latency and size: it is not on the front,
    trials.csv keeps it with feasible False and the threshold it violates, pareto.json names
    it, and both plots draw it as its own grey trace named after the floor."""
    import csv

    from dlas_search import plots
    trials = floored_trials()
    assert [r["trial"] for r in trials.front()] == [0, 1, 3]
    assert trials.violates(trials.rows[2]) == "accuracy 0.1 < min 0.5"
    assert trials.violates(trials.rows[0]) == ""
    paths = write(trials, tmp_path)
    table = {int(r["trial"]): r for r in csv.DictReader(paths["trials.csv"].open())}
    assert len(table) == 4
    assert (table[2]["feasible"], table[2]["violates"]) == ("False", "accuracy 0.1 < min 0.5")
    assert (table[0]["feasible"], table[0]["violates"]) == ("True", "")
    assert [int(r["trial"]) for r in csv.DictReader(paths["pareto.csv"].open())] == [0, 1, 3]
    data = json.loads(paths["pareto.json"].read_text())
    assert data["feasible"] == 3 and [r["trial"] for r in data["front"]] == [0, 1, 3]
    assert data["infeasible"] == [{"trial": 2, "name": "#2 model2",
                                   "violates": "accuracy 0.1 < min 0.5"}]

    figure = plots.pairs_figure(trials)
    label = "infeasible (below accuracy floor 0.5)"
    greyed = [t for t in figure.data if t.name == label]
    assert len(greyed) == 3  # one per pair of objectives, in the legend once
    assert [t.showlegend for t in greyed] == [True, False, False]
    assert all(t.marker.color == plots.INFEASIBLE and t.marker.symbol == "x" for t in greyed)
    assert all(list(t.x) == [FLOORED[2][0]] for t in greyed[:2])  # accuracy on x
    assert "accuracy 0.1 < min 0.5" in greyed[0].text[0]
    for trace in figure.data:  # no other trace holds trial 2
        if trace.name != label:
            assert not any("#2 " in text for text in (trace.text or ()))
    assert label in paths["pareto.html"].read_text()
    assert paths["pareto.png"].read_bytes()[:4] == b"\x89PNG"
    parallel = plots.parallel_figure(trials)
    feasible = next(d for d in parallel.data[0].dimensions if d.label == "feasible")
    assert list(feasible["values"]) == [1, 1, 0, 1]


def test_without_thresholds_nothing_is_greyed(tmp_path):
    from dlas_search import plots
    trials = floored_trials()
    trials.thresholds = {}
    assert [r["trial"] for r in trials.front()] == [0, 1, 2, 3]  # trial 2 the fastest
    assert trials.summary() == ""
    names = [t.name or "" for t in plots.pairs_figure(trials).data]
    assert not any(name.startswith("infeasible") for name in names)
    assert "feasible" not in [d.label for d in plots.parallel_figure(trials).data[0].dimensions]


def test_dlas_pareto_says_how_many_were_infeasible_and_why(workdir, monkeypatch, capsys):
    from dlas_search import cli, pareto
    monkeypatch.setattr(pareto, "export_from_mlflow", lambda uri, name, out: floored_trials())
    (workdir / "mlflow.db").touch()
    assert cli.main(["pareto", "--experiment", "floored",
                     "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}"]) == 0
    out = capsys.readouterr().out
    assert "3 of 4 finished trials on the Pareto front" in out
    assert "1 infeasible (below accuracy floor 0.5: 1)" in out
    assert "#2 model2: accuracy 0.1 < min 0.5" in out


def test_a_missing_metric_violates_its_threshold():
    trials = floored_trials()
    trials.thresholds = {"accuracy": {"min": 0.5}, "macs": {"max": 10}}
    assert trials.violates(trials.rows[0]) == "macs not measured"
    assert trials.violates(trials.rows[2]) == "accuracy 0.1 < min 0.5; macs not measured"
    assert trials.infeasible_label() == (
        "infeasible (macs not measured, below accuracy floor 0.5)")


SHIPPED = sorted(p for p in (ROOT / "spaces").glob("*.yaml") if p.name != "targets.yaml")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_space_has_an_accuracy_floor_well_above_chance(path):
    """A feasible front by default: every shipped space declares `thresholds: accuracy:
    {min: x}` at least twice chance for its dataset (the class count from the dataset
    registry), with a comment saying why that number."""
    from dlas_search.data import DATASETS
    from dlas_search.space import load_space
    space = load_space(path)
    floor = space.thresholds.get("accuracy", {}).get("min")
    assert floor is not None, f"{path.name}: no accuracy floor (thresholds: accuracy: min)"
    assert 0 < floor < 1
    for name in space.params["data.name"].values():
        classes = DATASETS.meta(name).get("classes")
        assert classes, f"the dataset registry does not know {name}'s class count"
        assert floor >= 2 / classes, f"{path.name}: floor {floor} is near chance (1/{classes})"
    assert "accuracy floor" in path.read_text() and "chance" in path.read_text()


def test_derived_parameters_leave_the_plots_and_the_importance(tmp_path):
    """model.stem follows model.arch and compress.calibration_images follows compress.method:
    neither gets an axis, a colour or an importance; the CSV still lists them, in the stack's
    order after the objectives; 12 trials are too few for a reliable importance."""
    import csv

    from dlas_search import pareto, plots
    objectives = {"accuracy": "maximize", "latency_ms": "minimize"}
    rows = []
    for i in range(12):
        arch, method = ("resnet18", "mobilenet_v2")[i % 2], ("none", "int8", "channel")[i % 3]
        rows.append({"trial": i, "run_id": f"r{i}", "name": f"{arch} {method}",
                     "params": {"model.arch": arch, "model.stem": {"resnet18": "standard"}.get(
                                    arch, "cifar"),
                                "compress.method": method, "compress.calibration_images":
                                    "128" if method == "int8" else "-",
                                "algo.conv": ("direct", "winograd")[i // 6],
                                "hw.threads": "1", "data.name": "digits"},
                     "metrics": {"accuracy": 0.5 + 0.03 * i, "latency_ms": 10.0 - 0.5 * (i % 5)}})
    trials = Trials("derived", objectives, rows)
    assert pareto.derived(trials) == {"model.stem": "model.arch",
                                      "compress.calibration_images": "compress.method"}
    assert pareto.informative(trials) == ["model.arch", "compress.method", "algo.conv"]
    paths = write(trials, tmp_path)
    labels = [d.label for d in plots.parallel_figure(trials).data[0].dimensions]
    assert labels == ["model.arch", "compress.method", "algo.conv", *objectives]
    parameters = [line.split(",")[1] for line in
                  paths["importance.csv"].read_text().splitlines()[1:]]
    assert "model.stem" not in parameters and "compress.calibration_images" not in parameters
    assert {"model.arch", "compress.method", "algo.conv"} & set(parameters)
    assert all(line.endswith(",12,False") for line in
               paths["importance.csv"].read_text().splitlines()[1:])
    data = json.loads(paths["pareto.json"].read_text())
    assert data["importance"]["reliable"] is False and "30" in data["importance"]["note"]
    assert data["constants"] == {"data.name": "digits", "hw.threads": "1"}
    header = next(csv.reader(paths["trials.csv"].open()))
    assert header[:4] == ["trial", "name", "accuracy", "latency_ms"]
    params = [h for h in header if "." in h]
    assert params == ["model.arch", "model.stem", "compress.calibration_images",
                      "compress.method", "algo.conv"]  # layers in the stack's order
    # the colour bar names the categories of what it colours by
    bar = plots.parallel_figure(trials).data[0].line.colorbar
    assert list(bar.ticktext) == ["mobilenet_v2", "resnet18"]


def test_a_one_off_coincidence_is_not_a_derivation():
    """Two parameters whose values never repeat determine each other only by chance."""
    from dlas_search import pareto
    rows = [{"trial": i, "run_id": f"r{i}", "name": f"#{i}",
             "params": {"compress.amount": str(0.1 * i), "finetune.lr": str(0.01 * i)},
             "metrics": {"accuracy": 0.1 * i}} for i in range(4)]
    trials = Trials("coincidence", {"accuracy": "maximize"}, rows)
    assert pareto.derived(trials) == {}


def test_the_terminal_summary_names_the_hypervolume_and_the_files(tmp_path):
    from dlas_search.cli_results import export_lines
    trials = floored_trials()
    write(trials, tmp_path)
    lines = export_lines(trials, tmp_path)
    assert lines[0].startswith(f"  hypervolume {trials.hypervolume:.4f}")
    assert lines[1] == ("  wrote importance.csv, pareto.csv, pareto.html, pareto.json, "
                        f"pareto.png, trials.csv in {tmp_path}")


def test_a_setting_seen_once_is_not_derived_and_the_always_present_one_stays():
    """compress.amount is set in one trial only: compress.method cannot be said to decide it.
    compiler.tuner and compiler.trials decide each other: trials (absent when untuned) goes."""
    from dlas_search import pareto
    rows = []
    for i, (method, amount, tuner) in enumerate([
            ("none", "-", "none"), ("none", "-", "metaschedule"), ("int8", "-", "none"),
            ("int8", "-", "metaschedule"), ("unstructured", "0.5", "metaschedule")]):
        rows.append({"trial": i, "run_id": f"r{i}", "name": f"#{i}",
                     "params": {"compress.method": method, "compress.amount": amount,
                                "compiler.tuner": tuner,
                                "compiler.trials": "16" if tuner != "none" else "-"},
                     "metrics": {"accuracy": 0.5 + 0.1 * i}})
    trials = Trials("seen-once", {"accuracy": "maximize"}, rows)
    assert pareto.derived(trials) == {"compiler.trials": "compiler.tuner"}


def test_a_confirmed_latency_comes_with_its_own_interval_and_baseline():
    """No row of the export pairs the confirmed latency with the search's interval."""
    search = {"latency_ms": 7.4, "latency_ci_low_ms": 7.3, "latency_ci_high_ms": 7.5,
              "torch_latency_ms": 10.3, "speedup_vs_torch": 1.40, "speedup_vs_torch_ci_low": 1.36}
    confirmed = {"latency_confirmed_ms": 5.2, "latency_confirmed_ci_low_ms": 5.16,
                 "latency_confirmed_ci_high_ms": 5.23, "torch_latency_confirmed_ms": 6.7,
                 "speedup_vs_torch_confirmed": 1.30, "speedup_vs_torch_confirmed_ci_low": 1.28}
    m = confirmed_metrics({**search, **confirmed, "accuracy": 0.92})
    assert (m["latency_ms"], m["latency_ci_low_ms"], m["latency_ci_high_ms"]) == (5.2, 5.16, 5.23)
    assert (m["torch_latency_ms"], m["speedup_vs_torch"], m["speedup_vs_torch_ci_low"]) == \
        (6.7, 1.30, 1.28)
    assert (m["latency_search_ms"], m["latency_search_ci_low_ms"], m["torch_latency_search_ms"],
            m["speedup_vs_torch_search"]) == (7.4, 7.3, 10.3, 1.40)
    assert m["accuracy"] == 0.92
    assert confirmed_metrics(dict(search)) == search  # never confirmed: as the search left it
