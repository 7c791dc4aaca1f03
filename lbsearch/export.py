"""Export: healed folders, the Pareto front's plans as files, and deployable healed models.

- A *healed folder* (:mod:`lbsearch.distill.healed`, re-exported here) holds the plan, the trained
  tensors (new attention parameters + LoRA) and a report; ``load_healed`` puts them onto a teacher.
- ``export_plans`` writes every plan of the front as YAML and JSON with its metrics per fidelity
  and what they were measured on; the files are plan files (``lbsearch heal --plan FILE``).
- A *deployable model* (``write_model``) is one folder: ``model.safetensors`` with LoRA merged
  into the base weights, the LSWA parameters, and no attention weights for removed layers; a
  ``config.json`` (the HF config plus an ``lbsearch`` section with the plan); the tokenizer.
  ``load_model`` rebuilds it, and ``generate()`` works unchanged. ``log_model`` logs it to MLflow as
  a models-from-code pyfunc (:mod:`lbsearch.model_code`): safetensors and code, no pickle.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from .distill.healed import HEALED_FILES, is_healed_folder, load_healed, save_healed  # noqa: F401 - re-exported
from .errors import LBSearchError
from .io import atomic_write_json, atomic_write_text, save_tensors
from .plan import Plan
from .surgery import apply_plan

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"


# -------------------------------------------------------------------------------- Pareto plans

def front_rows(storage: str, study: str | None = None) -> tuple[str, list[dict], dict]:
    """(study name, front rows, study user attributes) from an Optuna storage URL, recomputed from
    the storage alone; ``study`` may be left out when the storage holds one study."""
    from .search.pareto import load_front
    from .search.store import load_study
    from .tracking.front_html import rows_of

    st = load_study(storage, study)
    return st.study_name, rows_of(load_front(st).points, st.study_name), dict(st.user_attrs)


def find_row(rows: list[dict], ident: str) -> dict:
    """The front row named by a trial number, a plan key or a plan string."""
    for row in rows:
        if ident in (str(row["trial_number"]), Plan.parse(row["plan"]).key, row["plan"]):
            return row
    ids = ", ".join(str(r["trial_number"]) for r in rows)
    raise LBSearchError(f"--plan {ident}: not on the front; use a trial number ({ids}), a plan key or a plan string")


def _as_dict(result) -> dict:
    return result if isinstance(result, dict) else result.to_dict()


def export_plans(study_or_rows, out_dir: str | Path, meta: dict | None = None) -> list[Path]:
    """Write every front plan as ``trial-<n>-<key>.yaml`` and ``.json``, plus ``index.json``.

    ``study_or_rows``: an Optuna study or a :class:`lbsearch.search.pareto.Front` (its front
    is taken), or the front's rows: dicts with ``trial_number``, ``plan``, ``result`` (TrialResult or
    its dict), optionally ``rescored`` ({fidelity: result}), ``study`` and ``storage``. ``meta``:
    what the metrics were measured on (model, data, target; ``study`` and ``storage`` too).
    """
    import yaml

    from .tracking import storage_tag
    from .tracking.front_html import rows_of

    meta, rows = dict(meta or {}), study_or_rows
    if hasattr(rows, "best_trials"):  # an Optuna study
        from .search.pareto import load_front

        rows = load_front(rows)
    rows = rows_of(rows.points, rows.study) if hasattr(rows, "points") else list(rows)
    study, storage = meta.pop("study", None), meta.pop("storage", None)
    out, written, index = Path(out_dir), [], []
    for row in rows:
        plan = Plan.parse(row["plan"])
        result = _as_dict(row["result"])
        metrics = {result["fidelity"]: _without(result, "plan", "key")}
        metrics.update({f: _without(_as_dict(r), "plan", "key") for f, r in (row.get("rescored") or {}).items()})
        record = {**plan.to_dict(), "plan_key": plan.key, "trial_number": row.get("trial_number"),
                  "study": row.get("study", study), "storage": storage_tag(row.get("storage", storage) or ""),
                  "metrics": metrics, "measured_on": meta}
        stem = out / f"trial-{row.get('trial_number')}-{plan.key}"
        written += [atomic_write_text(stem.with_suffix(".yaml"), yaml.safe_dump(record, sort_keys=False)),
                    atomic_write_json(stem.with_suffix(".json"), record)]
        index.append({"trial_number": row.get("trial_number"), "plan": str(plan), "plan_key": plan.key,
                      "files": [stem.name + ".yaml", stem.name + ".json"]})
    written.append(atomic_write_json(out / "index.json", {"study": study, "plans": index}))
    return written


def _without(data: dict, *keys: str) -> dict:
    return {k: v for k, v in data.items() if k not in keys}


# -------------------------------------------------------------------------------- deployable models

def merged_state_dict(model) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The model's tensors with every LoRA adapter merged into its base weight (``W + s * B @ A``,
    in float64, without writing the model), under the plain module names; and the names dropped
    because they share storage with an earlier tensor (tied embeddings)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    state, seen, tied = {}, {}, []
    for key, tensor in model.state_dict().items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        ptr = (tensor.data_ptr(), tuple(tensor.shape))
        if ptr in seen:
            tied.append(key)
            continue
        seen[ptr] = key
        state[key] = tensor
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            weight = module.get_base_layer().weight
            merged = weight.double()
            for a in module.active_adapters:
                if a in module.lora_A:
                    merged = merged + module.scaling[a] * (module.lora_B[a].weight.double()
                                                           @ module.lora_A[a].weight.double())
            state[f"{name}.weight"] = merged.to(weight.dtype)
    return state, tied


def write_model(model, plan: Plan, tokenizer, out_dir: str | Path, meta: dict | None = None) -> Path:
    """Write ``model`` (the teacher with ``plan`` applied, LoRA adapters optional) as a deployable
    folder that :func:`load_model` rebuilds; ``meta`` goes into the config's ``lbsearch`` section."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state, tied = merged_state_dict(model)
    config = model.config.to_dict()
    config["lbsearch"] = {"format_version": FORMAT_VERSION, **plan.to_dict(), "plan_key": plan.key,
                          "lora_merged": True, "tied": tied, **(meta or {})}
    save_tensors(out / WEIGHTS, state, metadata={"format": "pt", "lbsearch_plan": str(plan)})
    atomic_write_json(out / "config.json", config)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def load_model(path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """Rebuild a model written by :func:`write_model`: the HF model from its config, the plan
    applied, the weights loaded strictly (only tied names may be absent). Eval mode, frozen."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from .models import check_family

    path = Path(path)
    for name in ("config.json", WEIGHTS):
        if not (path / name).is_file():
            raise LBSearchError(f"{path}: not an exported lbsearch model (missing {name})")
    data = json.loads((path / "config.json").read_text())
    meta = data.pop("lbsearch", None)
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise LBSearchError(f"{path}/config.json: no lbsearch section of format version {FORMAT_VERSION}")
    try:
        config = AutoConfig.for_model(data.pop("model_type", ""), **data)
    except (ValueError, KeyError, TypeError) as exc:
        raise LBSearchError(f"{path}/config.json: not a model config ({str(exc).splitlines()[0][:160]})") from None
    check_family(config, str(path))
    plan = Plan.from_dict(meta, source=f"{path}/config.json").check(config.num_hidden_layers, f"{path}/config.json")
    tensors = load_file(str(path / WEIGHTS))
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=next(iter(tensors.values())).dtype,
                                                 attn_implementation="sdpa")
    apply_plan(model, plan).originals.clear()  # deployed: nothing to restore; drops the removed attention
    result = model.load_state_dict(tensors, strict=False)
    missing = sorted(set(result.missing_keys) - set(meta.get("tied", [])))
    if missing or result.unexpected_keys:
        what = f"missing {missing[:3]}" if missing else f"unexpected {sorted(result.unexpected_keys)[:3]}"
        raise LBSearchError(f"{path}/{WEIGHTS}: does not match plan {plan}: {what}")
    if meta.get("tied"):
        model.tie_weights()
    model.eval().requires_grad_(False)
    return model.to(device=device, dtype=dtype) if device or dtype else model


def export_model(plan: Plan, model_out: str | Path, *, space, healed: str | Path | None = None,
                 work_dir: str | Path | None = None, heal_tokens: int | None = None, device: str | None = None,
                 model: str | None = None, meta: dict | None = None, say: Callable[[str], None] = print) -> Path:
    """Write ``plan``'s deployable model (:func:`write_model`) for the teacher of ``space`` (or ``model``).

    From ``healed`` (a healed folder) when given; otherwise the plan is healed now through a
    Workspace with ``heal_tokens`` (default: the space's full budget for the device), checkpointing
    to ``work_dir`` (resumable) and keeping the healed folder in ``work_dir/healed``.
    """
    from .models import load_teacher, load_tokenizer

    ref = model or space.model
    meta = {"teacher": ref, **(meta or {})}
    if healed is not None:
        healed_plan = Plan.load(Path(healed) / "plan.json")
        if healed_plan.key != plan.key:
            raise LBSearchError(f"{healed}: healed plan {healed_plan} is not plan {plan}")
        say(f"healed folder: {healed}")
        teacher = load_teacher(ref, device=device)
        load_healed(teacher, healed)
        return write_model(teacher, plan, load_tokenizer(ref), model_out, meta)
    from .workspace import Workspace

    if work_dir is None:
        raise ValueError("export_model: work_dir is needed to heal a plan")
    ws = Workspace.open(space, device=device, model=model)
    cfg = ws.heal_config(heal_tokens)
    step = cfg.batch_size * cfg.grad_accum * ws.space.data.seq_len
    say(f"plan {plan.key} has no healed folder: healing it now on {ws.device} with {cfg.tokens} tokens "
        f"({max(1, cfg.tokens // step)} steps of {step} tokens; the progress bar shows the time left; "
        f"checkpoints in {work_dir})")
    session = ws.student(plan, cfg, checkpoints=work_dir)
    with session as student:
        state = session.heal_state
        save_healed(student, plan, cfg, Path(work_dir) / "healed", {"tokens": state.tokens, "seconds": state.seconds})
        return write_model(student, plan, ws.tokenizer, model_out, meta)


def log_model(model_dir: str | Path, tracking_uri: str, run_id: str, name: str = "model"):
    """Log an exported model folder to the MLflow run ``run_id`` as a models-from-code pyfunc
    (prompts in, generated text out); returns MLflow's ModelInfo (``.model_uri``)."""
    import mlflow
    import transformers
    from mlflow.models import ModelSignature
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from . import __version__

    signature = ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                               params=ParamSchema([ParamSpec("max_new_tokens", "long", 32)]))
    requirements = [f"lbsearch=={__version__}", f"torch=={torch.__version__.split('+')[0]}",
                    f"transformers=={transformers.__version__}", "safetensors", f"mlflow=={mlflow.__version__}"]
    client = mlflow.MlflowClient(tracking_uri)
    status = client.get_run(run_id).info.status
    with _use_tracking_uri(tracking_uri):  # pyfunc.log_model has no client form: scope the fluent URI
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(name=name, python_model=str(Path(__file__).with_name("model_code.py")),
                                           artifacts={"model": str(Path(model_dir).resolve())},
                                           signature=signature, pip_requirements=requirements)
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return info
