"""``lbsearch run``: the method, step by step, in one run folder.

Every step leaves its result in the run folder (or the shared cache) and finds it there when run
again, so a re-run or ``--resume`` after a crash does only what is missing: teacher and corpus
(cache), sensitivity table, block library (cache), the study (Optuna storage: finished trials are
kept), the re-scored finalists (healed models under ``finalists/``), the benchmark, the report.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import run_steps as steps
from .run_config import RunConfig


@dataclass(frozen=True)
class RunReport:
    run_dir: Path
    front: object  # lbsearch.search.Front
    storage: str
    tracking_uri: str
    outputs: dict


def run(config: RunConfig) -> RunReport:
    from .search.driver import default_study_name
    from .search.store import open_storage, shown, sqlite_url
    from .tracking import Tracker, check_server
    from .workspace import Workspace, pick_device

    # 0. Settings, all checked before anything heavy: space, storage, tracking store, run folder.
    run_dir = config.run_dir(config.load_space()).resolve()
    config = steps.settings_of(run_dir, config)
    device = pick_device(config.device)
    space = config.space_as_run(config.load_space(), device)
    if (config.mlflow_uri or "").startswith(("http://", "https://")):
        check_server(config.mlflow_uri)  # unreachable: one line, before anything is written
    storage = config.storage or sqlite_url(run_dir)
    open_storage(storage)
    tracker = Tracker.open(config.mlflow_uri, run_dir, config.experiment)
    steps.save_settings(config, space, run_dir)
    study = config.study or default_study_name(space)

    # 1. Teacher, corpus, data splits, teacher logits (all cached by content).
    ws = Workspace.open(space, device=str(device))
    steps.save_data_sources(ws, run_dir)  # each source: kind, name, weight, tokens drawn

    # 2. Sensitivity: each layer changed alone -> the search's prior.
    table = steps.sensitivity_table(ws, run_dir / "sensitivity") if config.prior else None

    # 3. Block library: every LSWA layer the space allows, transferred from its softmax layer once.
    steps.build_library(ws)

    # 4. Search: Optuna over plans, scored by the workers; every trial logged to MLflow as it ends.
    tracker.start_study(study, params=run_params(config, space, ws.data_sources()), storage=storage,
                        tags={"run_dir": str(run_dir)})
    try:
        report, outputs = search_and_report(config, space, ws, table, tracker, storage, study, run_dir)
    except BaseException as exc:  # the parent run says how it ended; a resume sets it running again
        tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    tracker.finish()
    return RunReport(run_dir=run_dir, front=report.front, storage=shown(storage), tracking_uri=tracker.uri,
                     outputs=outputs)


def search_and_report(config, space, ws, table, tracker, storage: str, study: str, run_dir: Path):
    """Steps 4-7 of :func:`run`: the search, the finalists, their benchmark and the report."""
    from .search import SearchConfig, search

    search_config = SearchConfig(space=space, run_dir=run_dir, storage=storage, study_name=study, table=table,
                                 prior=config.prior, resume=True, finalists=run_dir / "finalists")
    with steps.executor(ws, config.workers, config.cpus_per_worker, config.ray_address, config.device) as executor:
        # 5. ... then the front's best plans re-scored, healed (kept under finalists/ for export).
        report = search(search_config, executor, callbacks=[steps.track_trials(tracker)])
    steps.catch_up(tracker, storage, study)

    # 6. On a GPU: the finalists' real serving throughput against the base.
    bench = steps.bench_finalists(ws, report.front, run_dir)
    steps.log_finalists(tracker, report.front, bench)

    # 7. Report and export: pareto.*, front.html, export/ — also onto the MLflow parent run.
    data_file = steps.save_data_sources(ws, run_dir)  # with the healing corpus, if healing drew one here
    meta = {"model": space.model, "data": space.data.model_dump(mode="json"), "data_sources": ws.data_sources(),
            "target": space.target.model_dump(mode="json")}
    outputs = steps.write_outputs(report.front, run_dir, storage, meta)
    tracker.log_artifacts({"space.yaml": run_dir / steps.SPACE_FILE, steps.DATA_FILE: data_file,
                           "sensitivity": run_dir / "sensitivity",
                           **{p.name: p for k, p in outputs.items() if k != "export"},
                           "export/plans": outputs["export"], "bench": run_dir / "bench"})
    return report, outputs


def run_params(config: RunConfig, space, data_sources: dict | None = None) -> dict:
    """The parent run's params: model, space (flattened by the tracker), budgets, sampler, seed, target,
    and what each data source gave the corpus (``data_sources.<i>.*``)."""
    sources = {"data_sources": steps.data_params(data_sources)} if data_sources else {}
    return {"model": space.model, "space": space.model_dump(mode="json", exclude={"cpu", "budgets", "search"}),
            "budgets": space.budgets.model_dump(mode="json"), "sampler": space.search.sampler,
            "seed": space.search.seed, "target": space.target.model_dump(mode="json"),
            "search": space.search.model_dump(mode="json", exclude={"sampler", "seed", "threshold_budgets"}),
            "workers": config.workers, "prior": config.prior, **sources}
