"""What a tracked search is called in MLflow: param and metric names, tags, the store's URI forms.

Flat metric names (``kl``, ``throughput_ratio``, ``real_<set>_kl``) so the UI's chart view can plot
any two of them across runs; params as strings within MLflow's limits.
"""
from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

from ..attention import KINDS
from ..errors import LBSearchError
from ..objective import TrialResult
from ..plan import Plan

STUDY_TAG, STORAGE_TAG, VERSION_TAG = "lbsearch.study", "lbsearch.storage", "lbsearch.code_version"
PARENT_TAG = "mlflow.parentRunId"
# plan numbers logged as one param each: the distinct values over the plan's layers
PLAN_FIELDS = {"window": "windows", "sinks": "sinks", "feature_dim": "feature_dims"}
# TrialResult fields logged as metrics (metric name -> attribute)
RESULT_METRICS = {"kl": "kl", "perplexity": "perplexity", "agreement": "agreement",
                  "throughput_ratio": "throughput_ratio", "tokens_per_s": "tokens_per_s",
                  "kv_mb_per_seq": "kv_mb_per_seq", "max_concurrency": "max_concurrency",
                  "trial_seconds": "seconds", "healing_tokens": "healing_tokens", "eval_tokens": "eval_tokens"}
MAX_PARAM, MAX_TAG = 6000, 8000  # MLflow's limits on param and tag values


def storage_tag(url: str) -> str:
    """A storage URL as it may be shown: the password replaced by ``***``."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL: drop anything that looks like user:password@
        return re.sub(r"//[^/@]*@", "//***@", url)


def flatten(params: dict, prefix: str = "") -> dict[str, str]:
    """Nested params as dotted keys with string values (lists comma-joined), cut to MLflow's limit."""
    out = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = ",".join(v if isinstance(v, str) else json.dumps(v) for v in value)
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return {k: v[:MAX_PARAM] for k, v in out.items()}


def metric_name(text: str) -> str:
    """A name MLflow and the UI's charts take: letters, digits and underscores."""
    return re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_") or "unnamed"


def plan_params(plan: str) -> dict[str, str]:
    """The trial's params: the plan string and key, layers per kind, the distinct LSWA numbers."""
    p = Plan.parse(plan)
    out = {"plan": plan, "plan_key": p.key, **{f"n_{k}": str(p.count(k)) for k in KINDS}}
    for field, name in PLAN_FIELDS.items():
        values = sorted({getattr(s, field) for s in p.layers if getattr(s, field) is not None})
        out[name] = ",".join(map(str, values)) or "-"
    return out


def result_metrics(result: TrialResult, prefix: str = "") -> dict[str, float]:
    """Flat metrics of a result (``real_<set>_kl`` for real text), so the UI plots them across runs."""
    out = {f"{prefix}{name}": float(getattr(result, attr)) for name, attr in RESULT_METRICS.items()}
    for name, quality in result.real_text.items():
        for key, value in quality.items():
            out[f"{prefix}real_{metric_name(name)}_{key}"] = float(value)
    return out


def numbers(data: dict, prefix: str) -> dict[str, float]:
    """The numbers in a (nested) dict as flat metrics ``<prefix><key>``; other values are skipped."""
    out = {}
    for key, value in data.items():
        name = f"{prefix}{metric_name(str(key))}"
        if isinstance(value, dict):
            out.update(numbers(value, name + "_"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def ui_command(run_dir: str | Path, port: int = 5000) -> str:
    """The command that opens the MLflow UI on a run folder's store."""
    db = (Path(run_dir) / "mlflow.db").resolve()
    return f"mlflow ui --backend-store-uri sqlite:///{db} --host 127.0.0.1 --port {port}"


UI_HINT = ("In the UI's chart view choose 'Show all' runs (it shows the first 10 by default) and add a "
           "scatter chart of kl against throughput_ratio.")


def check_server(uri: str, timeout: float = 3.0) -> None:
    """One-line error unless an MLflow server answers ``/health`` at ``uri``."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            if resp.status == 200:
                return
            reason = f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = (str(getattr(exc, "reason", exc)).splitlines() or [type(exc).__name__])[0][:160]
    raise LBSearchError(f"--mlflow-uri {uri}: MLflow server not reachable ({reason}); start it, or leave "
                        "--mlflow-uri out to log to mlflow.db in the run folder")
