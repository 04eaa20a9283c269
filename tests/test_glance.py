"""The front at a glance in MLflow: the runs' `dlas.pareto` tags and marked names, the study
run's description with the front's links and key figures, kept right when the front changes."""
import json

from mlflow.tracking import MlflowClient

from dlas_search import glance, pareto, tracking

OBJECTIVES = {"accuracy": "maximize", "latency_ms": "minimize", "size_mb": "minimize"}


def study_in_mlflow(uri: str, points: dict[str, tuple]) -> tuple[MlflowClient, str, dict]:
    """A study as the search logs it: the parent run and one trial run per point."""
    tracker = tracking.Tracker(uri, "glance")
    parent = tracker.open_study(OBJECTIVES, "space.yaml", "study: glance\n", {
        "dlas.description": "Three made-up trials.",
        "dlas.thresholds": json.dumps({"accuracy": {"min": 0.5}})})
    runs = {}
    for number, (name, values) in enumerate(points.items()):
        runs[name] = tracker.start_trial(number, name, {"model.arch": name})
        tracker.finish_trial(runs[name], dict(zip(OBJECTIVES, values)), {})
    return tracker.client, parent, runs


def test_the_front_is_tagged_named_and_described(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, parent, runs = study_in_mlflow(uri, {
        "fast": (0.80, 1.0, 5.0), "accurate": (0.95, 4.0, 5.0),
        "dominated": (0.85, 5.0, 6.0), "broken": (0.30, 0.5, 1.0)})  # below the floor
    trials = pareto.export_from_mlflow(uri, "glance", tmp_path / "out")
    tags = {name: client.get_run(run_id).data.tags for name, run_id in runs.items()}
    assert {n: t[glance.PARETO] for n, t in tags.items()} == {
        "fast": "true", "accurate": "true", "dominated": "false", "broken": "false"}
    assert tags["broken"][glance.FEASIBLE] == "false" and tags["fast"][glance.FEASIBLE] == "true"
    names = {n: client.get_run(r).info.run_name for n, r in runs.items()}
    assert names["fast"] == glance.MARK + "#0 fast" and names["dominated"] == "#2 dominated"
    assert [r["name"] for r in trials.front()] == ["#0 fast", "#1 accurate"]  # not the mark

    study = client.get_run(parent).data
    note = study.tags[glance.NOTE]
    assert note.startswith("**Front: 2 of 3 feasible trials** (4 finished, hypervolume ")
    assert "\n\nThree made-up trials.\n" in note  # the space's description, after the front
    experiment = trials.experiment_id
    for name in ("fast", "accurate"):  # a row per front run, linking to it
        assert f"(#/experiments/{experiment}/runs/{runs[name]})" in note
    assert f"runs/{runs['dominated']})" not in note
    assert "Best accuracy 0.95 ([" in note and "latency_ms 1 ([" in note  # not broken's 0.5
    assert study.metrics["best_accuracy"] == 0.95 and study.metrics["best_latency_ms"] == 1.0
    assert study.metrics["hypervolume"] == trials.hypervolume > 0
    assert "pruned before any work" not in note  # none were
    # the trials' shared view: a flat table with the objectives and parameters as columns
    assert f"]({glance.view_link(experiment)})" in note
    view = json.loads(client.get_experiment(experiment).tags[
        f"mlflow.sharedViewState.{glance.VIEW}"])
    assert view["searchFilter"] == "tags.`dlas.role` = 'trial'"
    assert view["orderByKey"] == "metrics.`accuracy`" and view["orderByAsc"] is False
    assert view["selectedColumns"][:3] == ["metrics.`accuracy`", "metrics.`latency_ms`",
                                          "metrics.`size_mb`"]
    assert "params.`model.arch`" in view["selectedColumns"]
    assert client.get_experiment(experiment).tags["mlflow.experimentKind"] == \
        "custom_model_development"

    # a study whose sampler repeated itself: the trial numbers it skipped are explained
    client.set_tag(parent, glance.UNRUN, "3")
    pareto.export_from_mlflow(uri, "glance", tmp_path / "out")
    note = client.get_run(parent).data.tags[glance.NOTE]
    assert "3 sampled configuration(s) were pruned before any work" in note

    # the study goes on: "dominated" becomes the best of all, the others leave the front
    client.log_batch(runs["dominated"], metrics=[
        tracking._metrics({"accuracy": 0.99, "latency_ms": 0.9, "size_mb": 4.0})[i]
        for i in range(3)])
    pareto.export_from_mlflow(uri, "glance", tmp_path / "out")
    names = {n: client.get_run(r).info.run_name for n, r in runs.items()}
    assert names == {"fast": "#0 fast", "accurate": "#1 accurate",
                     "dominated": glance.MARK + "#2 dominated", "broken": "#3 broken"}
    assert client.get_run(runs["fast"]).data.tags[glance.PARETO] == "false"


def test_a_tie_names_the_trial_on_the_front():
    """Two int8 builds of one model share their size; the best size names the faster one."""
    rows = [{"trial": n, "run_id": f"r{n}", "params": {},
             "metrics": dict(zip(OBJECTIVES, values))}
            for n, values in enumerate([(0.92, 9.0, 2.5), (0.92, 5.6, 2.5), (0.90, 3.0, 7.6)])]
    tops = glance.best(pareto.Trials("tie", OBJECTIVES, rows))
    assert tops["size_mb"][1]["trial"] == 1 and tops["size_mb"][0] == 2.5
    assert tops["accuracy"][1]["trial"] == 1 and tops["latency_ms"][1]["trial"] == 2
