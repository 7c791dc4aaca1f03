"""Export: Pareto plans as files, a deployable healed model (round trip against the in-memory
healed model), MLflow models-from-code logging without pickle, and the `lbsearch export` command."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import tiny_model, write_tiny_space
from safetensors.torch import load_file, save_file

import lbsearch
from lbsearch.cli import main
from lbsearch.distill import add_lora
from lbsearch.errors import LBSearchError
from lbsearch.export import export_plans, load_model, log_model, save_healed, write_model
from lbsearch.objective import TrialResult
from lbsearch.plan import Plan
from lbsearch.recipe import HealConfig
from lbsearch.surgery import apply_plan


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def result(plan: str, kl: float, thr: float, fidelity: str = "assembled") -> TrialResult:
    return TrialResult(plan=plan, key=Plan.parse(plan).key, fidelity=fidelity, kl=kl, perplexity=10 + kl,
                       agreement=0.9, eval_tokens=128, real_text={"python-docs": {"kl": kl, "perplexity": 9.0,
                                                                                   "agreement": 0.8}},
                       throughput_ratio=thr, tokens_per_s=100 * thr, kv_bytes_per_seq=4096, max_concurrency=8,
                       cost_source="analytic")


@pytest.fixture(scope="module")
def healed(tmp_path_factory, tokenizer):
    """A tiny plan healed for one step in a Workspace; its logits and greedy generation in memory;
    then a healed folder and a deployable model written from the same model."""
    from lbsearch.workspace import Workspace

    root = tmp_path_factory.mktemp("export")
    space = write_tiny_space(root, tokenizer, layers=4)
    with pytest.MonkeyPatch.context() as mp:  # Workspace.open(cache=...) sets LBSEARCH_CACHE for the process
        mp.setenv("LBSEARCH_CACHE", str(root / "cache"))
        ws = Workspace.open(space, device="cpu", progress=False)
        plan = ws.parse_plan("SL8NL16")
        ids = ws.heldout.blocks[:2]
        cfg = ws.heal_config(128)
        with ws.student(plan, cfg) as model:
            logits = model(ids).logits
            greedy = model.generate(ids[:1, :8], max_new_tokens=10, do_sample=False)
            save_healed(model, plan, cfg, root / "healed")
            write_model(model, plan, ws.tokenizer, root / "model", {"trial_number": 0})
    return SimpleNamespace(root=root, space=space, plan=plan, ids=ids, logits=logits, greedy=greedy)


# ------------------------------------------------------------------------- deployable model

@pytest.mark.slow
def test_exported_model_matches_the_in_memory_healed_model(healed):
    model = lbsearch.load_model(healed.root / "model")
    assert rel_err(model(healed.ids).logits, healed.logits) < 1e-6
    out = model.generate(healed.ids[:1, :8], max_new_tokens=10, do_sample=False)
    assert torch.equal(out, healed.greedy)


@pytest.mark.slow
def test_exported_folder_drops_removed_attention_and_holds_config_and_tokenizer(healed):
    folder = healed.root / "model"
    keys = set(load_file(str(folder / "model.safetensors")))
    assert not [k for k in keys if k.startswith("model.layers.2.self_attn")]  # layer 2 is none
    assert "model.layers.2.mlp.up_proj.weight" in keys
    assert {"model.layers.1.self_attn.base.q_proj.weight", "model.layers.1.self_attn.feature_map.weight",
            "model.layers.1.self_attn.gate_logit", "model.layers.0.self_attn.o_proj.weight"} <= keys
    assert not [k for k in keys if "lora_" in k or "base_layer" in k]
    config = json.loads((folder / "config.json").read_text())
    section = config["lbsearch"]
    assert section["plan"] == str(healed.plan) and section["format_version"] == 1 and section["trial_number"] == 0
    assert [layer["kind"] for layer in section["layers"]] == ["softmax", "lswa", "none", "lswa"]
    assert config["num_hidden_layers"] == 4 and (folder / "tokenizer.json").is_file()
    assert lbsearch.load_tokenizer(str(folder))("model layer").input_ids


def test_lora_merge_is_exact_and_tied_embeddings_round_trip(tmp_path, tokenizer):
    model = tiny_model("llama", vocab=49152, tie=True)
    plan = Plan.parse("SL8f16NS")
    apply_plan(model, plan)
    add_lora(model, HealConfig(lora_rank=2, lora_alpha=4))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name or "gate_logit" in name:
            p.data.normal_(0, 0.05)
    ids = torch.randint(0, 49152, (2, 24))
    expected = model(ids).logits
    write_model(model, plan, tokenizer, tmp_path / "m")
    assert "lm_head.weight" not in load_file(str(tmp_path / "m" / "model.safetensors"))
    loaded = load_model(tmp_path / "m")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert rel_err(loaded(ids).logits, expected) < 1e-6
    assert torch.equal(loaded.generate(ids[:1, :6], max_new_tokens=8, do_sample=False),
                       model.generate(ids[:1, :6], max_new_tokens=8, do_sample=False))


def test_load_model_rejects_what_does_not_match_its_plan(tmp_path, tokenizer):
    model = tiny_model("llama", vocab=49152)
    plan = Plan.parse("SNSS")
    apply_plan(model, plan)
    write_model(model, plan, tokenizer, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(weights))
    with pytest.raises(LBSearchError, match="not an exported lbsearch model"):
        load_model(tmp_path / "nowhere")
    save_file({k: v for k, v in tensors.items() if "layers.0.self_attn.q_proj" not in k}, str(weights))
    with pytest.raises(LBSearchError, match=r"does not match plan SNSS: missing \['model.layers.0.self_attn.q_proj"):
        load_model(tmp_path / "m")
    save_file({**tensors, "model.layers.1.self_attn.q_proj.weight": torch.zeros(64, 64)}, str(weights))
    with pytest.raises(LBSearchError, match="unexpected"):
        load_model(tmp_path / "m")


# ------------------------------------------------------------------------- plans and MLflow

def test_export_plans_writes_yaml_and_json_per_front_plan(tmp_path):
    rows = [{"trial_number": 3, "plan": "SL8f16NS", "result": result("SL8f16NS", 0.2, 1.5),
             "rescored": {"brief": result("SL8f16NS", 0.1, 1.5, "brief").to_dict()}},
            {"trial_number": 7, "plan": "SNNS", "result": result("SNNS", 0.9, 2.0).to_dict()}]
    meta = {"model": "tiny", "data": {"source": "corpus.jsonl"}, "study": "s", "storage": "postgresql://u:pw@h/db"}
    written = export_plans(rows, tmp_path / "plans", meta)
    assert len(written) == 5 and (tmp_path / "plans" / "index.json").is_file()
    path = tmp_path / "plans" / f"trial-3-{Plan.parse('SL8f16NS').key}.yaml"
    record = yaml.safe_load(path.read_text())
    assert record == json.loads(path.with_suffix(".json").read_text())
    assert record["plan"] == "SL8f16NS" and record["trial_number"] == 3 and record["study"] == "s"
    assert record["layers"][1] == {"kind": "lswa", "window": 8, "sinks": 4, "feature_dim": 16}
    assert record["metrics"]["assembled"]["kl"] == 0.2 and record["metrics"]["brief"]["kl"] == 0.1
    assert record["measured_on"] == {"model": "tiny", "data": {"source": "corpus.jsonl"}}
    assert "pw" not in record["storage"] and str(Plan.load(path)) == "SL8f16NS"


def _head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(2)


def assert_no_pickle(folder: Path) -> dict:
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".pkl", ".pickle", ".pt", ".bin")]
    assert not [p for p in files if _head(p) in (b"\x80\x04", b"\x80\x05")]  # pickle protocol 4/5 streams
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in pyfunc
    assert Path(pyfunc["model_code_path"]).name == "model_code.py" and (folder / "model_code.py").is_file()
    assert pyfunc["artifacts"]["model"]["path"] == "artifacts/model"
    assert (folder / "artifacts" / "model" / "model.safetensors").is_file()
    return mlmodel


@pytest.mark.slow
def test_log_model_is_code_and_safetensors_and_predicts(healed, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from lbsearch.tracking import Tracker

    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    tracker = Tracker.open(None, tmp_path / "run", "lbsearch-test")
    tracker.start_study("s", {"model": "tiny"})
    tracker.log_trial(0, result(str(healed.plan), 0.1, 1.4), "COMPLETE", "w")
    run_id = tracker.trial_run(0)
    info = log_model(healed.root / "model", tracker.uri, run_id)
    assert tracker.client.get_run(run_id).info.status == "FINISHED"
    logged = tracker.client.get_logged_model(info.model_id)
    assert logged.source_run_id == run_id and logged.experiment_id == tracker.experiment_id
    folder = Path(logged.artifact_location.removeprefix("file://"))
    assert folder.is_relative_to(tmp_path / "run" / "mlartifacts")
    assert_no_pickle(folder)
    with _use_tracking_uri(tracker.uri):
        predictor = mlflow.pyfunc.load_model(info.model_uri)
    out = predictor.predict(["model layer attention", "cache"], params={"max_new_tokens": 4})
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ------------------------------------------------------------------------- the command

def fake_run(run_dir: Path, space: Path, rows: list[tuple[str, float, float]], model: str) -> Path:
    """A run folder as `lbsearch run` leaves it: the space and a study stored like the search driver's."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(space, run_dir / "space.yaml")
    study = optuna.create_study(storage=f"sqlite:///{run_dir / 'optuna.db'}", study_name="lbsearch-tiny",
                                directions=["minimize", "maximize"])
    brief = result(rows[0][0], rows[0][1] / 2, rows[0][2], "brief")
    for key, value in {"objectives": ["kl", "throughput"], "fidelity": "assembled", "reference_point": [10.0, 0.0],
                       "model": model, "hypervolume": [], "rescored": {"0": {"brief": brief.to_dict()}}}.items():
        study.set_user_attr(key, value)
    for plan, kl, thr in rows:
        study.add_trial(optuna.trial.create_trial(
            values=[kl, thr], constraints={"memory": -1.0},
            user_attrs={"plan": plan, "key": Plan.parse(plan).key, "result": result(plan, kl, thr).to_dict()}))
    study.add_trial(optuna.trial.create_trial(values=[5.0, 0.5], user_attrs={"plan": "SSSS", "key": "x",
                                                                             "result": result("SSSS", 5, .5).to_dict()}))
    return run_dir


def export(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["export", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_export_help_and_one_line_errors(tmp_path, capsys, tokenizer):
    with pytest.raises(SystemExit) as done:
        main(["export", "--help"])
    assert done.value.code == 0 and "--model-out" in capsys.readouterr().out
    code, _, err = export(capsys, tmp_path / "missing")
    assert code == 2 and err.count("\n") == 1 and "run folder not found" in err
    space = write_tiny_space(tmp_path, tokenizer, layers=4)
    run = fake_run(tmp_path / "run", space, [("SL8f16NS", 0.1, 1.4), ("SNNS", 0.9, 2.5)], str(tmp_path / "tiny"))
    code, _, err = export(capsys, run, "--plan", "99")
    assert code == 2 and err.count("\n") == 1 and "--plan 99: not on the front" in err and "0, 1" in err
    (tmp_path / "file").write_text("")
    code, _, err = export(capsys, run, "--plan", "0", "--model-out", tmp_path / "file" / "model")
    assert code == 2 and err.count("\n") == 1 and "--model-out" in err and "cannot write" in err
    code, _, err = export(capsys, run, "--plan", "0", "--log-model")
    assert code == 2 and err.count("\n") == 1 and "no MLflow run of study lbsearch-tiny" in err
    code, out, err = export(capsys, run)
    assert code == 0, err
    assert "2 plans on the front" in out and "SSSS" not in out
    files = sorted(p.name for p in (run / "export" / "plans").iterdir())
    assert len(files) == 5 and "index.json" in files
    record = json.loads((run / "export" / "plans" / f"trial-0-{Plan.parse('SL8f16NS').key}.json").read_text())
    assert record["metrics"]["brief"]["kl"] == 0.05 and record["study"] == "lbsearch-tiny"
    assert record["measured_on"]["model"] == str(tmp_path / "tiny")


@pytest.mark.slow
def test_export_command_model_from_healed_folder_logged_to_mlflow(healed, tmp_path, capsys, monkeypatch):
    from lbsearch.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    plan = str(healed.plan)
    run = fake_run(tmp_path / "run", healed.space, [(plan, 0.1, 1.4), ("SNNS", 0.9, 2.5)], str(healed.root / "tiny"))
    shutil.copytree(healed.root / "healed", run / "finalists" / healed.plan.key / "healed")
    tracker = Tracker.open(None, run, "lbsearch-tiny")
    tracker.start_study("lbsearch-tiny", {"model": "tiny"}, storage=f"sqlite:///{run / 'optuna.db'}")
    tracker.log_trial(0, result(plan, 0.1, 1.4), "COMPLETE", "w")
    tracker.finish()
    code, out, err = export(capsys, run, "--plan", healed.plan.key, "--log-model")
    assert code == 0, err
    folder = run / "export" / f"model-{healed.plan.key}"
    assert f"wrote model: {folder}" in out and "logged model: models:/" in out
    assert rel_err(load_model(folder)(healed.ids).logits, healed.logits) < 1e-6
    logged = tracker.client.search_logged_models(experiment_ids=[tracker.experiment_id])
    assert len(logged) == 1 and logged[0].source_run_id == tracker.trial_run(0)


@pytest.mark.slow
def test_export_command_heals_a_plan_without_healed_folder(healed, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LBSEARCH_CACHE", str(healed.root / "cache"))
    run = fake_run(tmp_path / "run", healed.space, [("SL16f16NS", 0.1, 1.4)], str(healed.root / "tiny"))
    code, out, err = export(capsys, run, "--plan", "0", "--heal-tokens", "128", "--model-out", tmp_path / "m")
    assert code == 0, err
    assert "has no healed folder: healing it now on cpu with 128 tokens" in out
    key = Plan.parse("SL16f16NS").key
    assert (run / "export" / f"heal-{key}" / "healed" / "weights.safetensors").is_file()
    model = load_model(tmp_path / "m")
    ids = healed.ids[:1, :8]
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape[1] > 8
