"""MLflow tracking of a search: one parent run per study, one nested run per trial.

Only the search driver logs (workers never touch MLflow), through ``MlflowClient`` alone: no
fluent ``mlflow.start_run`` state. The default store is a SQLite database in the run folder with
the experiment's artifacts beside it (MLflow 3 would otherwise write ``./mlruns`` under the
working directory); an ``http(s)://`` URI logs to a server, checked before any compute starts.

Resuming is idempotent: the parent run is found again by its study and storage tags, a trial's
child by its ``trial_number`` tag, and params that are already there are not logged again. A call
that fails after MLflow's own retries (server restart) is queued, in memory and in
``<run dir>/tracking-queue.jsonl``, and replayed in order by the next call or by :meth:`finish`.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ..errors import LBSearchError
from ..objective import TrialResult
from .names import (MAX_PARAM, MAX_TAG, PARENT_TAG, STORAGE_TAG, STUDY_TAG, VERSION_TAG, check_server, flatten,
                    numbers, plan_params, result_metrics, storage_tag)

log = logging.getLogger(__name__)

QUEUE_FILE = "tracking-queue.jsonl"
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}  # the UI opens on runs, not GenAI traces
# Optuna trial state -> MLflow run status (states left out keep the child RUNNING)
RUN_STATUS = {"COMPLETE": "FINISHED", "FAIL": "FAILED", "PRUNED": "KILLED"}
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
BATCH = 100  # MLflow's limit on params + tags per log_batch
TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}


def _transient(exc: BaseException) -> bool:
    """Errors worth a retry later: the store could not be reached, or it failed on its side."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in TRANSIENT_CODES
    return isinstance(exc, (requests.RequestException, OSError))


def _without_traceback(record: logging.LogRecord) -> bool:
    """MLflow logs a store's SQL error with its traceback (and the chain of an interrupt it met)
    before raising it; the tracker says it in one line and queues the call, so drop that record."""
    return not record.exc_info


def _now_ms() -> int:
    return int(time.time() * 1000)


# -------------------------------------------------------------------------------- the tracker

class Tracker:
    """The driver's MLflow writer; build one with :meth:`open`, then :meth:`start_study`."""

    def __init__(self, client, uri: str, run_dir: Path, experiment_id: str):
        self.client, self.uri, self.run_dir, self.experiment_id = client, uri, run_dir, experiment_id
        self.parent_id: str | None = None
        self.changed: dict[str, str] = {}  # params whose value differs from the resumed run's
        self._children: dict[int, str] = {}
        self._created: set[str] = set()  # child runs this Tracker made: nothing to compare against
        self._queue: list[dict] = self._read_queue()
        self._warned = False

    @classmethod
    def open(cls, uri: str | None, run_dir: str | Path, experiment: str = "lbsearch") -> "Tracker":
        """The store at ``uri`` (default: SQLite in ``run_dir``), with ``experiment`` created if needed.

        A server URI is checked first, so an unreachable one fails fast, before any compute.
        """
        server = bool(uri) and uri.startswith(("http://", "https://"))
        if server:
            check_server(uri)
        elif uri and (uri.startswith("file:") or "://" not in uri):
            raise LBSearchError(f"--mlflow-uri {uri}: MLflow 3 refuses file stores; use sqlite:///ABS/PATH.db "
                                "or http://HOST:PORT")
        from mlflow import MlflowClient

        for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):  # "Creating initial tables..."
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("mlflow.store.db.utils").addFilter(_without_traceback)
        run_dir = Path(run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        uri = uri or f"sqlite:///{run_dir / 'mlflow.db'}"
        client = MlflowClient(tracking_uri=uri)
        try:
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                location = None if server else (run_dir / "mlartifacts").as_uri()
                exp_id = client.create_experiment(experiment, artifact_location=location, tags=EXPERIMENT_TAGS)
            else:
                exp_id = exp.experiment_id
                if exp.lifecycle_stage == "deleted":
                    client.restore_experiment(exp_id)
        except Exception as exc:
            raise LBSearchError(f"MLflow store {storage_tag(uri)}: {str(exc).splitlines()[0][:200]}") from None
        return cls(client, uri, run_dir, exp_id)

    @classmethod
    def locate(cls, uri: str | None, run_dir: str | Path, study_name: str, storage: str = "") -> "Tracker | None":
        """A Tracker on the existing parent run of ``study_name`` (in any experiment of the store),
        preferring the one tagged with ``storage``; None when the store or the run is not there.
        Nothing is created, so it suits readers such as ``lbsearch export --log-model``."""
        from mlflow import MlflowClient

        run_dir = Path(run_dir).resolve()
        if uri and uri.startswith(("http://", "https://")):
            check_server(uri)
        elif not uri and not (run_dir / "mlflow.db").is_file():
            return None
        uri = uri or f"sqlite:///{run_dir / 'mlflow.db'}"
        client = MlflowClient(tracking_uri=uri)
        ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(ids, filter_string=f"tags.`{STUDY_TAG}` = {_quote(study_name)}",
                                  order_by=["attributes.start_time ASC"]) if ids else []
        runs = [r for r in runs if r.data.tags.get(STORAGE_TAG) == storage_tag(storage)] or runs
        if not runs:
            return None
        tracker = cls(client, uri, run_dir, runs[0].info.experiment_id)
        tracker.parent_id = runs[0].info.run_id
        tracker._children = tracker._find_children()
        return tracker

    # ---- the study's parent run
    def start_study(self, study_name: str, params: dict, tags: dict | None = None, storage: str = "") -> str:
        """Start (or continue, after a crash) the study's parent run; returns its id.

        ``params`` may nest (flattened to dotted names). On resume only new params are logged; a
        changed value becomes a ``changed.<name>`` tag and a warning, since MLflow params are immutable.
        """
        from .. import code_version

        tags = {STUDY_TAG: study_name, STORAGE_TAG: storage_tag(storage), VERSION_TAG: code_version(),
                **{k: str(v)[:MAX_TAG] for k, v in (tags or {}).items()}}
        run = self._find_parent(study_name, tags[STORAGE_TAG])
        if run is None:
            run = self.client.create_run(self.experiment_id, tags=tags, run_name=study_name)
            old = {}
        else:
            if run.info.status != "RUNNING":
                self.client.update_run(run.info.run_id, status="RUNNING")
            old = run.data.params
        self.parent_id = run.info.run_id
        self._queue = [q for q in self._queue if q["op"] != "end"]  # a resumed study is not ended
        new = flatten(params)
        fresh = {k: v for k, v in new.items() if k not in old}
        self.changed = {k: v for k, v in new.items() if k in old and old[k] != v}
        for key, value in self.changed.items():
            log.warning("MLflow param %s changed on resume: %r -> %r (kept the old value; tag changed.%s)",
                        key, old[key], value, key)
        self._batch(self.parent_id, params=fresh,
                    tags={**tags, **{f"changed.{k}": v[:MAX_TAG] for k, v in self.changed.items()}})
        self._children = self._find_children()
        return self.parent_id

    def _find_parent(self, study: str, storage: str):
        runs = self.client.search_runs([self.experiment_id], order_by=["attributes.start_time ASC"],
                                       filter_string=f"tags.`{STUDY_TAG}` = {_quote(study)} and "
                                                     f"tags.`{STORAGE_TAG}` = {_quote(storage)}")
        return runs[0] if runs else None

    def _find_children(self, trial_number: int | None = None, ended: bool = False) -> dict[int, str]:
        query = f"tags.`{PARENT_TAG}` = {_quote(self.parent_id)}"
        if ended:
            query += " and attributes.status != 'RUNNING'"
        if trial_number is not None:
            query += f" and tags.trial_number = {_quote(str(trial_number))}"
        found, token = {}, None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1000,
                                           page_token=token, order_by=["attributes.start_time ASC"])
            for run in page:
                found.setdefault(int(run.data.tags["trial_number"]), run.info.run_id)
            token = page.token
            if not token:
                return found

    # ---- logging calls (queued when the store cannot be reached)
    def log_trial(self, trial_number: int, result: TrialResult | None, state: str, worker: str = "",
                  fail_reason: str | None = None, plan: str | None = None) -> bool:
        """The trial's nested run (created once): plan params, flat metrics, fidelity/worker/state tags.

        ``plan`` names the plan when there is no result (failed or infeasible trials). Returns
        False when the call was queued because the store could not be reached.
        """
        return self._call("trial", number=trial_number, result=result.to_dict() if result else None,
                          state=state, worker=worker, fail_reason=fail_reason, plan=plan)

    def log_finalist(self, trial_number: int, healed: TrialResult, bench: dict | None = None) -> bool:
        """A finalist's healed metrics (``healed_*``, fidelity tag) and measured benchmark (``bench_*``)."""
        return self._call("finalist", number=trial_number, healed=healed.to_dict(), bench=bench)

    def log_artifacts(self, paths: dict[str, str | Path]) -> bool:
        """Files or folders onto the parent run: ``{artifact path in the run: local path}``.

        A file keeps its own name when the artifact path's last part equals it, and is stored
        under that name otherwise; missing local paths are skipped (logged at debug level).
        """
        return self._call("artifacts", paths={k: str(v) for k, v in paths.items()})

    def finish(self, status: str = "FINISHED") -> bool:
        """End the parent run after replaying everything queued; False when something stays queued
        (it is kept in ``tracking-queue.jsonl`` and replayed by the next Tracker on this run folder)."""
        if status not in RUN_STATUSES:
            raise ValueError(f"status {status!r}; allowed: {', '.join(RUN_STATUSES)}")
        done = self._call("end", status=status)
        if not done:
            log.warning("MLflow store %s unreachable: %d logging calls kept in %s", storage_tag(self.uri),
                        len(self._queue), self.run_dir / QUEUE_FILE)
        return done

    def logged_trials(self) -> set[int]:
        """Trials whose nested run was logged to the end (it is terminated) and has nothing queued."""
        queued = {q["args"]["number"] for q in self._queue if q["op"] == "trial"}
        return set(self._find_children(ended=True)) - queued

    def trial_run(self, trial_number: int, plan: str | None = None) -> str:
        """The id of the trial's nested run, created (with the plan's params) when missing."""
        run_id = self._children.get(trial_number) or self._find_children(trial_number).get(trial_number)
        if run_id is None:
            tags = {PARENT_TAG: self.parent_id, "trial_number": str(trial_number)}
            run_id = self.client.create_run(self.experiment_id, tags=tags, run_name=f"trial {trial_number}").info.run_id
            self._created.add(run_id)
            if plan:
                self._batch(run_id, params=plan_params(plan), check=False)
        self._children[trial_number] = run_id
        return run_id

    def _call(self, op: str, **args) -> bool:
        if self.parent_id is None:
            raise RuntimeError("Tracker.start_study first")
        self._queue.append({"op": op, "args": args})
        return self.flush()

    def flush(self) -> bool:
        """Replay queued calls in order; True when none is left."""
        ops = {"trial": self._do_trial, "finalist": self._do_finalist, "artifacts": self._do_artifacts,
               "end": self._do_end}
        while self._queue:
            item = self._queue[0]
            try:
                ops[item["op"]](**item["args"])
            except Exception as exc:
                if not _transient(exc):
                    self._queue.pop(0)  # a call the store refuses must not block the ones after it
                    self._write_queue()
                    raise
                if not self._warned:
                    log.warning("MLflow store %s unreachable (%s); queuing logging calls in %s",
                                storage_tag(self.uri), str(exc).splitlines()[0][:160], self.run_dir / QUEUE_FILE)
                    self._warned = True
                self._write_queue()
                return False
            self._queue.pop(0)
        self._write_queue()
        self._warned = False
        return True

    # ---- what the calls do (each idempotent, so a replay after a partial failure is safe)
    def _do_trial(self, number: int, result: dict | None, state: str, worker: str, fail_reason: str | None,
                  plan: str | None) -> None:
        res = TrialResult.from_dict(result) if result else None
        plan = res.plan if res else plan
        run_id = self.trial_run(number)
        tags = {"trial_number": str(number), "state": state, "worker": worker}
        if res:
            tags["fidelity"] = res.fidelity
        if fail_reason:
            tags["fail_reason"] = fail_reason[:MAX_TAG]
        self._batch(run_id, params=plan_params(plan) if plan else {}, tags=tags,
                    metrics=result_metrics(res) if res else {}, check=run_id not in self._created)
        self._created.discard(run_id)  # it holds values now: later calls compare against them
        if state in RUN_STATUS:
            self.client.set_terminated(run_id, RUN_STATUS[state])

    def _do_finalist(self, number: int, healed: dict, bench: dict | None) -> None:
        res = TrialResult.from_dict(healed)
        run_id = self.trial_run(number, res.plan)
        metrics = {**result_metrics(res, "healed_"), **numbers(bench or {}, "bench_")}
        self._batch(run_id, metrics=metrics, tags={"finalist": "true", "healed_fidelity": res.fidelity})

    def _do_artifacts(self, paths: dict[str, str]) -> None:
        import shutil
        import tempfile

        for dest, local in paths.items():
            src = Path(local)
            folder, _, name = dest.strip("/").rpartition("/")
            if src.is_dir():
                self.client.log_artifacts(self.parent_id, str(src), dest.strip("/") or None)
            elif not src.is_file():
                log.debug("artifact %s: %s does not exist; skipped", dest, src)
            elif name in ("", src.name):
                self.client.log_artifact(self.parent_id, str(src), (folder if name else dest.strip("/")) or None)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    copy = shutil.copyfile(src, Path(tmp) / name)
                    self.client.log_artifact(self.parent_id, str(copy), folder or None)

    def _do_end(self, status: str) -> None:
        self.client.set_terminated(self.parent_id, status)

    def _batch(self, run_id: str, params: dict | None = None, metrics: dict | None = None,
               tags: dict | None = None, check: bool = True) -> None:
        """Log what is not there yet: new params only, metrics whose latest value differs, all tags
        (``check=False``: the run is known to hold none of them; the same param value twice is fine)."""
        from mlflow.entities import Metric, Param, RunTag

        params, metrics, tags = params or {}, metrics or {}, tags or {}
        if check and (params or metrics):
            data = self.client.get_run(run_id).data
            params = {k: v for k, v in params.items() if k not in data.params}
            metrics = {k: v for k, v in metrics.items() if not _same(data.metrics.get(k), v)}
        stamp = _now_ms()
        items = ([Param(k, v[:MAX_PARAM]) for k, v in params.items()],
                 [Metric(k, v, stamp, 0) for k, v in metrics.items()],
                 [RunTag(k, v[:MAX_TAG]) for k, v in tags.items()])
        p, m, t = (list(x) for x in items)
        while p or m or t:
            n_p = p[:BATCH]
            n_t = t[:BATCH - len(n_p)]
            self.client.log_batch(run_id, metrics=m[:1000], params=n_p, tags=n_t)
            p, m, t = p[len(n_p):], m[1000:], t[len(n_t):]

    # ---- the queue file
    def _read_queue(self) -> list[dict]:
        path = self.run_dir / QUEUE_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def _write_queue(self) -> None:
        from ..io import atomic_write_text

        path = self.run_dir / QUEUE_FILE
        if self._queue:
            atomic_write_text(path, "".join(json.dumps(item) + "\n" for item in self._queue))
        else:
            path.unlink(missing_ok=True)


def _same(old: float | None, new: float) -> bool:
    return old is not None and (old == new or (old != old and new != new))


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
