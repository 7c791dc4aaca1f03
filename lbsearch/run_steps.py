"""The steps of ``lbsearch run`` that take more than a line (:mod:`lbsearch.pipeline` strings them
together). Each one leaves its result in the run folder and, run again, finds it there."""
from __future__ import annotations

from pathlib import Path

from .errors import LBSearchError
from .io import atomic_write_json, atomic_write_text, read_json, writable_dir

SPACE_FILE, CONFIG_FILE, BENCH_FILE = "space.yaml", "run.json", "bench/finalists.json"
DATA_FILE = "data_sources.json"


def say(text: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"lbsearch: {text}")


# -- the run folder ----------------------------------------------------------------------------
def settings_of(run_dir: Path, config):
    """The run's settings: with ``config.resume``, those saved in the run folder (settings given
    now override them); else ``config``. Paths are made absolute, so a resume works from anywhere."""
    from .run_config import parse_run_config

    saved = run_dir / CONFIG_FILE
    if config.resume:
        if not saved.is_file():
            raise LBSearchError(f"--resume: {run_dir} holds no run ({CONFIG_FILE} missing); run without --resume")
        try:
            data = read_json(saved)
        except (ValueError, UnicodeDecodeError):
            raise LBSearchError(f"{saved}: damaged (not JSON); run without --resume, or remove it") from None
        given = config.model_dump(exclude_defaults=True, exclude={"resume"})
        config = parse_run_config({**data, **given} if isinstance(data, dict) else data, str(saved))
    writable_dir(run_dir)
    absolute = {k: str(Path(v).resolve()) for k in ("space", "out") if (v := getattr(config, k))}
    return config.model_copy(update={**absolute, "out": str(run_dir)})


def save_settings(config, space, run_dir: Path) -> None:
    """run.json (what ``--resume`` reads) and space.yaml (the space as run; export reads it)."""
    import yaml

    atomic_write_json(run_dir / CONFIG_FILE, config.model_dump(mode="json", exclude={"resume"}))
    atomic_write_text(run_dir / SPACE_FILE, yaml.safe_dump(space.model_dump(mode="json", exclude={"cpu"}),
                                                           sort_keys=False))


def save_data_sources(ws, run_dir: Path) -> Path:
    """data_sources.json: each training source (kind, name, weight, tokens drawn) of the corpus and,
    once built, of the healing corpus (rewritten when that changes)."""
    return atomic_write_json(run_dir / DATA_FILE, ws.data_sources())


def data_params(sources: dict) -> dict:
    """The corpus's sources as MLflow params: ``data_sources.<i>.kind / source / weight / tokens``."""
    corpus = sources.get("corpus") or {}
    return {"key": corpus.get("key"), "tokens": corpus.get("tokens"),
            **{str(s["index"]): {k: s[k] for k in ("kind", "source", "weight", "tokens", "documents")}
               for s in corpus.get("sources", [])}}


# -- sensitivity and the block library ---------------------------------------------------------
def sensitivity_table(ws, folder: Path):
    """The per-layer sensitivity table (untrained lswa and none), computed once into ``folder``."""
    from .evaluate import teacher_logits
    from .plan import LayerSpec
    from .sensitivity import SensitivityTable, sensitivity

    path = folder / "sensitivity.json"
    if path.is_file():
        try:
            table = SensitivityTable.load(path)
            if table.n_layers == ws.n_layers:
                return table
        except (ValueError, KeyError, TypeError, StopIteration):
            say(f"{path}: damaged, computing it again")
    seq, tokens = ws.space.data.seq_len, ws.space.budgets.sensitivity_tokens
    blocks = ws.blocks["heldout"][: max(1, tokens // seq)]
    say(f"sensitivity: each of {ws.n_layers} layers changed alone, on {blocks.numel()} held-out tokens")
    teacher = teacher_logits(ws.model, blocks, model_key=ws.key)
    specs = {"lswa": ws.space.default_lswa(), "none": LayerSpec(kind="none")}
    table = sensitivity(ws.model, blocks, teacher, specs, progress=ws.progress, model_name=ws.space.model)
    table.save(folder)
    return table


def build_library(ws) -> int:
    """Train every block the space can use (each LSWA layer spec) once; returns how many were new."""
    from .attention import KINDS

    pairs = [(i, s) for i in range(ws.n_layers) for s in ws.space.layer_specs(i) if KINDS[s.kind].trainable]
    todo = ws.library.missing(pairs)
    if todo:
        say(f"block library: training {len(todo)} of {len(pairs)} LSWA blocks (each layer's feature map and "
            f"gate fitted to its softmax output; kept in {ws.library.root} for every later run)")
    return len(ws.library.ensure(ws.model, pairs, ws.blocks["calibration"], progress=ws.progress))


# -- the executor --------------------------------------------------------------------------------
def executor(ws, workers: int = 1, cpus_per_worker: int = 1, ray_address: str | None = None,
             device: str | None = None):
    """In this process (one worker, no Ray address), else Ray actors that each open the workspace.
    ``RAY_ADDRESS`` (set inside a Ray job) counts as a Ray address, as ``--ray-address``'s help says."""
    import os

    if workers < 1 or cpus_per_worker < 1:
        raise LBSearchError(f"--workers {workers} / --cpus-per-worker {cpus_per_worker}: must be at least 1")
    address = ray_address or os.environ.get("RAY_ADDRESS")
    if workers == 1 and not address:
        from .executors.local import LocalExecutor

        return LocalExecutor(ws)
    from .executors.base import WorkspaceSpec
    from .executors.ray import RayExecutor

    spec = WorkspaceSpec(space=ws.space.model_dump(mode="json"), device=device,
                         cache=os.environ.get("LBSEARCH_CACHE"), library=str(ws.library.root))
    return RayExecutor(spec, workers=None if address and workers == 1 else workers,
                       cpus_per_worker=cpus_per_worker, address=ray_address)


# -- tracking ------------------------------------------------------------------------------------
def track_trials(tracker):
    """The driver callback logging each finished trial's nested MLflow run."""

    def on_trial(study, number, outcome, state) -> None:
        if state is None:  # a re-score: logged with the finalists
            return
        result = outcome.result if outcome else None
        trial = None if result else study.get_trials(deepcopy=False)[number]
        tracker.log_trial(number, result, state.name, worker=outcome.worker if outcome else "",
                          fail_reason=(outcome.error if outcome else None) or
                          (trial.user_attrs.get("infeasible") if trial else None),
                          plan=result.plan if result else trial.user_attrs.get("plan"))

    return on_trial


def catch_up(tracker, storage: str, study_name: str) -> int:
    """Log the finished trials that have no MLflow run yet (a driver killed between the study
    and MLflow); returns how many."""
    from optuna.trial import TrialState

    from .objective import TrialResult
    from .search.store import load_study

    study, n, logged = load_study(storage, study_name), 0, tracker.logged_trials()
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)):
        if t.number not in logged:
            result = TrialResult.from_dict(t.user_attrs["result"]) if "result" in t.user_attrs else None
            tracker.log_trial(t.number, result, t.state.name, worker=t.user_attrs.get("worker", ""),
                              fail_reason=t.user_attrs.get("fail_reason") or t.user_attrs.get("infeasible"),
                              plan=t.user_attrs.get("plan"))
            n += 1
    return n


def log_finalists(tracker, front, bench: dict) -> None:
    """Healed metrics and measured speed of every re-scored front plan, on its trial's run."""
    from .search.report import best_result

    for p in front.points:
        fidelity, result = best_result(p, front.fidelity)
        if fidelity != front.fidelity or p.key in bench:
            tracker.log_finalist(p.trial, result, bench.get(p.key))


# -- finalists on a GPU: the real serving benchmark ----------------------------------------------
def bench_finalists(ws, front, run_dir: Path, on_cpu: bool = False) -> dict:
    """Measured decode throughput of the re-scored front plans against the base, at the space's
    target batch and lengths, with the decode engine: on a GPU (bf16), or on the CPU when asked
    (float32; tests). ``{}`` otherwise. Cached in the run folder, per plan key."""
    path = run_dir / BENCH_FILE
    if ws.device.type != "cuda" and not on_cpu:
        return {}
    plans = [p for p in front.points if p.rescored]
    done = read_json(path) if path.is_file() else {}
    todo = [p for p in plans if p.key not in done]
    if todo:
        import torch

        from .bench import sweep
        from .models import load_teacher
        from .plan import Plan

        target = ws.space.target
        say(f"serving benchmark: {len(todo)} finalists against the base, batch {target.batch}, "
            f"prompt {target.prompt}, output {target.output}")
        dtype = torch.bfloat16 if ws.device.type == "cuda" else torch.float32
        model = load_teacher(ws.space.model, dtype=dtype, device=str(ws.device))
        rows, _ = sweep(model, [Plan.parse(p.plan) for p in todo], [target.batch], target.prompt, target.output,
                        measure_costs=False, log=say)
        del model
        by_plan = {r["plan"]: r for r in rows}
        done.update({p.key: {k: v for k, v in by_plan[str(Plan.parse(p.plan))].items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)} for p in todo})
        atomic_write_json(path, done)
    return done


# -- the report ------------------------------------------------------------------------------------
def write_outputs(front, run_dir: Path, storage: str, meta: dict) -> dict[str, Path]:
    """pareto.json/.csv/.png, hypervolume.png, front.html and the exported plans."""
    from .export import export_plans
    from .search.report import write_report
    from .tracking import front_html

    paths = write_report(front, run_dir, storage)
    paths["html"] = atomic_write_text(run_dir / "front.html", front_html(front, title=f"Pareto front: {front.study}"))
    export_plans(front, run_dir / "export" / "plans", {**meta, "study": front.study, "storage": storage})
    paths["export"] = run_dir / "export" / "plans"  # where `lbsearch export RUN_DIR` writes them too
    return paths
