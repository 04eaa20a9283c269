"""The objective's record of a trial in Optuna: what optuna-dashboard shows of a study (short
user attributes: a name, the reason a trial was pruned, measurements that are not objectives;
the whole configuration as a system attribute), read through optuna-dashboard's own API."""
import io
import json
import wsgiref.util

import optuna
import pytest

from conftest import TINY_SPACE, write_space
from mlflow.tracking import MlflowClient

from dlas_search import glance, pipeline, tracking
from dlas_search.objective import CONFIG, config_of
from dlas_search.search import run_search
from dlas_search.space import load_space

# sparse format needs unstructured pruning: compress.method none with it is ruled out
SPACE = TINY_SPACE.replace("amount: [0.5, 0.8]", "amount: 0.8").replace(
    "algo: {conv: [direct, direct_nhwc]}", "algo: {conv: [direct, im2col_gemm], format: sparse}")
SHORT = 200  # characters: one line of a dashboard column, not a page


@pytest.fixture
def study(workdir, monkeypatch) -> optuna.Study:
    """A small study with completed trials and trials pruned for both reasons (a ruled-out
    configuration, a repeat), the pipeline replaced by instant numbers."""
    ran = []

    def run_instantly(config, cache=None, gates=None):
        ran.append(config)
        return pipeline.TrialResult({"accuracy": 0.5 + 0.1 * len(ran), "size_mb": 1.0,
                                     "latency_ms": 10.0 / len(ran), "speedup_vs_torch": 1.0,
                                     "sparsity": 0.8, "trial_s": 1.0})

    monkeypatch.setattr(pipeline, "run", run_instantly)
    space = load_space(write_space(workdir, SPACE))
    storage = f"sqlite:///{workdir}/optuna.db"
    first = optuna.create_study(study_name="tiny", storage=storage,
                                directions=space.directions)
    for method, conv in (("unstructured", "direct"), ("unstructured", "direct"),  # a repeat
                         ("none", "direct"),  # ruled out
                         ("unstructured", "im2col_gemm")):
        first.enqueue_trial({"compress.method": method, "algo.conv": conv})
    return run_search(space, study_name="tiny", trials=2, storage=storage).study


def test_user_attributes_are_short_and_say_why_a_trial_was_pruned(study):
    states = {t.number: t.state.name for t in study.trials}
    assert list(states.values())[:4] == ["COMPLETE", "PRUNED", "PRUNED", "COMPLETE"]
    assert study.metric_names == ["accuracy", "latency_ms", "size_mb"]
    for t in study.trials:
        for key, value in t.user_attrs.items():
            assert len(json.dumps(value)) <= SHORT, (t.number, key, value)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    for t in done:
        config = json.loads(config_of(t))  # the whole configuration, as a system attribute
        assert config["model.arch"] == "resnet18" and t.system_attrs[CONFIG]
        assert "config" not in t.user_attrs
        assert t.user_attrs["name"].startswith("resnet18 unstructured")
        assert not {"accuracy", "latency_ms", "size_mb"} & set(t.user_attrs)  # the values
        assert t.user_attrs["speedup_vs_torch"] == 1.0  # not an objective: kept
    repeat, ruled_out = study.trials[1], study.trials[2]
    assert repeat.user_attrs["pruned"] == "same configuration as trial 0"
    assert ruled_out.user_attrs["pruned"].startswith("infeasible: algo.format sparse needs")
    assert config_of(repeat) is None and config_of(ruled_out) is None  # never ran
    # and MLflow says why its trial numbers skip those two (the study run's description)
    client = MlflowClient(tracking.default_tracking_uri())
    parent = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                                f"tags.`{tracking.ROLE}` = 'study'")[0]
    assert parent.data.tags[glance.UNRUN] == "2"
    assert "2 sampled configuration(s) were pruned before any work" in \
        parent.data.tags[glance.NOTE]


def test_optuna_dashboard_renders_the_study(study):
    """optuna-dashboard's own WSGI app and JSON API (what its trial list is drawn from): the
    study, its objective names, every trial with its short attributes and the front."""
    from optuna_dashboard import wsgi
    app = wsgi(study._storage)

    def get(path: str, query: str = "") -> tuple[str, bytes]:
        environ = {"PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": "GET",
                   "wsgi.input": io.BytesIO()}
        wsgiref.util.setup_testing_defaults(environ)
        status = []
        body = b"".join(app(environ, lambda s, h, exc=None: status.append(s)))
        return status[0], body

    status, body = get("/api/studies")
    assert status.startswith("200")
    listed = json.loads(body)["study_summaries"]
    assert [s["study_name"] for s in listed] == ["tiny"]
    status, body = get(f"/api/studies/{listed[0]['study_id']}", "after=0")
    assert status.startswith("200")
    detail = json.loads(body)
    assert detail["objective_names"] == ["accuracy", "latency_ms", "size_mb"]
    assert len(detail["trials"]) == len(study.trials)
    attrs = {t["number"]: {a["key"]: a["value"] for a in t["user_attrs"]}
             for t in detail["trials"]}
    assert attrs[1]["pruned"] == "same configuration as trial 0"
    assert attrs[0]["name"].startswith("resnet18 unstructured")
    assert {k["key"] for k in detail["union_user_attrs"]}.isdisjoint({"config"})
    assert {t["number"] for t in detail["best_trials"]} <= {0, 3}
    note = detail["note"]["body"]  # the study's note: the front by name, importance caveat
    assert note.startswith("## tiny: 1 trial(s) on the front"), note
    assert "| #3 resnet18 unstructured0.8 im2col_gemm" in note, note
    assert "below 30, neither this dashboard's importance nor importance.csv" in note
    status, page = get("/dashboard")  # the single-page app the browser loads
    assert status.startswith("200") and b"<html" in page.lower()
