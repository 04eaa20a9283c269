"""MLflow conventions in one place: one experiment per study, a parent run for the study, a
child run per trial, parameters by layer with dotted names, metrics as in docs/architecture.md.

The embedded default backend is a SQLite file under `tracking/` (artifacts beside it); a URL
points at a tracking server or another database instead.
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from .errors import BadInput

__all__ = ["TRACKING_DIR", "ROLE", "STUDY", "TRIAL", "SUPERSEDED", "EXTENDS", "URI_SCHEMES", "ABSENT",
           "default_tracking_uri", "check_tracking_uri", "CONNECT_TIMEOUT_S",
           "check_database", "environment_tags", "Tracker", "link_launcher_run", "add_to_run"]


TRACKING_DIR = Path("tracking")
ROLE, STUDY, TRIAL = "dlas.role", "dlas.study", "dlas.trial"
# tuning in rounds (rounds.py): an earlier round's run names the run that extended it, which
# names the run it extends
SUPERSEDED, EXTENDS = "dlas.superseded_by", "dlas.extends"
URI_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "file", "databricks")
ABSENT = "-"  # the logged value of a parameter that does not apply to a trial


def default_tracking_uri() -> str:
    return f"sqlite:///{(TRACKING_DIR / 'mlflow.db').resolve()}"


def check_tracking_uri(uri: str) -> str:
    """Accept what MLflow accepts as a backend; refuse typos before anything is written."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0] if "://" in uri or ":" in uri else ""
    if scheme not in URI_SCHEMES:
        raise BadInput(f"--tracking-uri {uri!r}: unknown scheme; allowed: "
                       + ", ".join(f"{s}://..." for s in URI_SCHEMES))
    if scheme == "sqlite":
        _check_sqlite_path(uri, "--tracking-uri")
    elif scheme in ("http", "https"):
        _check_server(uri)
    elif scheme in ("postgresql", "mysql", "mssql"):
        check_database(uri, "--tracking-uri")
    return uri


CONNECT_TIMEOUT_S = 5  # an unreachable store is reported in seconds, not after a long hang


def _check_server(uri: str) -> None:
    """A tracking server must answer (MLflow's `/health`) before the study starts."""
    import urllib.error
    import urllib.request
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=CONNECT_TIMEOUT_S).close()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            return  # a server that wants credentials: MLflow's client sends them
        raise BadInput(f"--tracking-uri {uri!r}: the server there is not an MLflow tracking "
                       f"server (HTTP {e.code} for /health); give the address of "
                       "`mlflow server` or a database URL") from None
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise BadInput(f"--tracking-uri {uri!r}: no tracking server answers there ({reason}); "
                       "start one (mlflow server --host 127.0.0.1 --port 5000) or give a "
                       "database URL, e.g. sqlite:///tracking/mlflow.db") from None


def check_database(url: str, flag: str) -> None:
    """A server database (PostgreSQL, MySQL, ...) must have its driver installed and accept a
    connection within CONNECT_TIMEOUT_S (else BadInput naming the flag and the reason)."""
    import sqlalchemy
    from sqlalchemy.exc import NoSuchModuleError
    backend = make_url(url).get_backend_name()
    timeout = {"postgresql": {"connect_timeout": CONNECT_TIMEOUT_S},
               "mysql": {"connect_timeout": CONNECT_TIMEOUT_S},
               "mssql": {"timeout": CONNECT_TIMEOUT_S}}.get(backend, {})
    try:
        engine = sqlalchemy.create_engine(url, connect_args=timeout)
    except (ImportError, NoSuchModuleError) as e:
        hint = {"postgresql": "pip install 'psycopg[binary]'", "mysql": "pip install mysqlclient"
                }.get(backend, "install the SQLAlchemy driver it names")
        raise BadInput(f"{flag} {url!r}: the {backend} driver is not installed ({e}); "
                       f"{hint}") from None
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as e:
        first = str(getattr(e, "orig", e)).strip().splitlines()[0]
        raise BadInput(f"{flag} {url!r}: cannot connect to the database ({first})") from None
    finally:
        engine.dispose()


def _check_sqlite_path(uri: str, flag: str) -> None:
    try:
        database = make_url(uri).database
    except ArgumentError as e:
        raise BadInput(f"{flag} {uri!r}: not a database URL ({e})") from None
    if not database or database == ":memory:":
        raise BadInput(f"{flag} {uri!r}: an in-memory database keeps nothing; give a file, "
                       "e.g. sqlite:///tracking/mlflow.db")
    parent = Path(database).resolve().parent
    existing = next((p for p in [parent, *parent.parents] if p.exists()), None)
    if existing is None or not os.access(existing, os.W_OK) or not existing.is_dir():
        raise BadInput(f"{flag} {uri!r}: cannot create {database} ({existing} is not a "
                       "writable folder)")


def environment_tags() -> dict[str, str]:
    """Versions, CPU and commit: what someone comparing runs needs to know."""
    import mlflow
    import optuna
    import torch
    import tvm

    from .hardware import cpu_model
    tags = {"dlas.torch": torch.__version__, "dlas.tvm": tvm.__version__,
            "dlas.optuna": optuna.__version__, "dlas.mlflow": mlflow.__version__,
            "dlas.python": platform.python_version(), "dlas.cpu": cpu_model(),
            "dlas.cores": str(os.cpu_count())}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10)
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def _metrics(values: dict[str, float]) -> list[Metric]:
    """MLflow metrics stamped now; missing and non-finite values are left out."""
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, 0) for k, v in values.items()
            if v is not None and math.isfinite(float(v))]


def add_to_run(client: MlflowClient, run_id: str, metrics: dict[str, float],
               tags: dict[str, str]) -> None:
    """Add metrics and tags to a run that may have finished (its status is left as it is)."""
    client.log_batch(run_id, metrics=_metrics(metrics),
                     tags=[RunTag(k, v) for k, v in tags.items()])


def _param_value(value: Any) -> str:
    return ABSENT if value is None else str(value)


class Tracker:
    """The study's MLflow experiment and parent run, and its trials' child runs."""

    def __init__(self, uri: str, study: str):
        self.uri, self.study = uri, study
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id: str | None = None
        self.parent_id: str | None = None

    def open_study(self, objectives: dict[str, str], space_path: str, space_text: str,
                   extra_tags: dict[str, str]) -> str:
        """Find or create the experiment and the study's parent run; mark it running."""
        if self.uri.startswith("sqlite:"):
            Path(make_url(self.uri).database).resolve().parent.mkdir(parents=True, exist_ok=True)
        experiment = self.client.get_experiment_by_name(self.study)
        if experiment is None:
            location = None
            if self.uri.startswith("sqlite:"):  # keep artifacts beside the database
                db = Path(make_url(self.uri).database).resolve()
                location = (db.parent / "artifacts" / self.study).as_uri()
            # "model training", not GenAI: what MLflow's UI shows the experiment as
            self.experiment_id = self.client.create_experiment(
                self.study, location, tags={"mlflow.experimentKind": "custom_model_development"})
        else:
            self.experiment_id = experiment.experiment_id
        parent = self._first_parent()
        if parent:
            self.parent_id = parent
            self.client.update_run(self.parent_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=f"study {self.study}",
                                         tags={ROLE: "study", STUDY: self.study})
            self.parent_id = self._first_parent()
            if self.parent_id != run.info.run_id:  # another machine created one meanwhile:
                self.client.delete_run(run.info.run_id)  # all keep the earliest
        tags = {**environment_tags(), **extra_tags, "dlas.objectives": json.dumps(objectives),
                "dlas.space": space_path}
        self.client.log_batch(self.parent_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.log_text(self.parent_id, space_text, "space.yaml")
        return self.parent_id

    def _first_parent(self) -> str | None:
        parents = self.client.search_runs(
            [self.experiment_id], f"tags.`{ROLE}` = 'study' and tags.`{STUDY}` = '{self.study}'",
            max_results=1, order_by=["attributes.start_time ASC"])  # ties: by run id
        return parents[0].info.run_id if parents else None

    def attach(self, experiment_id: str, parent_id: str) -> None:
        """Log trials under a study another process opened (a worker under its launcher)."""
        self.experiment_id, self.parent_id = experiment_id, parent_id

    def start_trial(self, number: int, name: str, params: dict[str, Any],
                    tags: dict[str, str] | None = None) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=f"#{number} {name}",
            tags={"mlflow.parentRunId": self.parent_id, ROLE: "trial", STUDY: self.study,
                  TRIAL: str(number), **(tags or {})})
        self.client.log_batch(run.info.run_id,
                              params=[Param(k, _param_value(v)) for k, v in params.items()])
        return run.info.run_id

    def finish_trial(self, run_id: str, metrics: dict[str, float], tags: dict[str, str],
                     artifacts: dict[str, Path] | None = None,
                     deploy: dict | None = None) -> str | None:
        """Log the trial's results and keep its artifact folders (e.g. `tuning`: the records
        its compiled schedules came from), then end the run. With `deploy` for a library built
        for the local CPU, its `model/model.so` becomes the run's MLflow Model `compiled`
        (mlmodel.py) and is stored there alone; the folder `pytorch` (an MLflow Model saved by
        the trial) becomes the LoggedModel `pytorch`. The compiled model's id (or None)."""
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        model_id, models, artifacts = None, [], dict(artifacts or {})
        library = artifacts.get("model", Path("-")) / "model.so"
        if deploy and "input_shape" in deploy and library.is_file():
            from .mlmodel import log_compiled
            model_id = log_compiled(self.uri, run_id, library, deploy)
            models.append(model_id)
            library.unlink()  # stored once: in the model
        if "pytorch" in artifacts:  # an MLflow Model already saved: logged as one
            from .mlmodel import log_saved
            models.append(log_saved(self.uri, run_id, artifacts.pop("pytorch"), deploy or {}))
        if models:  # the metrics, once per model, linked to it and the dataset
            from .mlmodel import link_metrics
            link_metrics(self.client, run_id, _metrics(metrics), models, deploy or {})
        else:
            self.client.log_batch(run_id, metrics=_metrics(metrics))
        for name, folder in artifacts.items():
            if not any(folder.iterdir()):
                continue
            self.client.log_artifacts(run_id, str(folder), name)
        self.client.set_terminated(run_id, "FINISHED")
        return model_id

    def supersede(self, earlier: str, later: str) -> None:
        """A later tuning round's run `later` takes the configuration's row: the earlier
        round's run moves under it (rounds.py)."""
        self.client.set_tag(earlier, "mlflow.parentRunId", later)
        self.client.set_tag(earlier, SUPERSEDED, later)

    def fail_trial(self, run_id: str, error: str, status: str = "FAILED",
                   layer: str | None = None) -> None:
        """Record why the trial broke (artifact error.txt, tag dlas.error, and the layer it
        broke in: tag dlas.failed_layer), then end it."""
        try:
            if layer:
                self.client.set_tag(run_id, "dlas.failed_layer", layer)
            self.client.log_text(run_id, error, "error.txt")
            last = error.strip().splitlines()[-1] if error.strip() else "unknown error"
            self.client.set_tag(run_id, "dlas.error", last[:5000])
        finally:
            self.client.set_terminated(run_id, status)

    def reachable(self) -> str | None:
        """None when the tracking store answers; otherwise why not (one cheap request)."""
        try:
            self.client.get_experiment(self.experiment_id)
            return None
        except Exception as e:
            return f"{type(e).__name__}: {str(e)[:500]}"

    def close_study(self, status: str, artifacts: Path | None = None,
                    metrics: dict[str, float] | None = None) -> None:
        if artifacts is not None and artifacts.exists():
            self.client.log_artifacts(self.parent_id, str(artifacts), "pareto")
        if metrics:
            self.client.log_batch(self.parent_id, metrics=_metrics(metrics))
        self.client.set_terminated(self.parent_id, status)


def link_launcher_run(study: str, uri: str, parent_id: str, artifacts: Path | None) -> None:
    """Under `mlflow run`, point the launcher's own run at the study's parent run and copy the
    Pareto export (but its HTML page, which the study's run holds) to it, so the run `mlflow
    run` prints leads to the results."""
    launcher = os.environ.get("MLFLOW_RUN_ID")
    if not launcher or launcher == parent_id:
        return
    client = MlflowClient(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"))
    client.log_batch(launcher, tags=[RunTag(STUDY, study), RunTag("dlas.tracking_uri", uri),
                                     RunTag("dlas.study_run_id", parent_id)])
    if artifacts is not None and artifacts.exists():  # the plot page (plotly inlined, about
        for path in sorted(artifacts.iterdir()):  # 5 MB) stays on the study's run alone
            if path.is_file() and path.suffix != ".html":
                client.log_artifact(launcher, str(path), "pareto")
