"""MLflow models-from-code entry point of an exported lbsearch model (see lbsearch.export.log_model).

MLflow stores this file as the model's code and the exported folder (safetensors, config.json,
tokenizer) as its ``model`` artifact, so nothing is pickled; loading runs this file, which
rebuilds the model with :func:`lbsearch.load_model`. ``predict`` takes text prompts (a list, a
string, or a one-column DataFrame) and returns the greedy continuations.
"""
from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


def _prompts(model_input) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "iloc"):  # pandas DataFrame / Series: the first column
        column = model_input.iloc[:, 0] if getattr(model_input, "ndim", 1) == 2 else model_input
        return [str(v) for v in column.tolist()]
    return [str(v) for v in model_input]


class LBSearchModel(PythonModel):
    def load_context(self, context):
        import torch
        from transformers import AutoTokenizer

        from lbsearch.export import load_model

        path = context.artifacts["model"]
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(path, device=self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)

    def predict(self, context, model_input, params=None):
        import torch

        new_tokens = int((params or {}).get("max_new_tokens", 32))
        out = []
        with torch.no_grad():
            for prompt in _prompts(model_input):
                ids = self.tokenizer(prompt, return_tensors="pt").input_ids.to(self.device)
                gen = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                          do_sample=False, pad_token_id=self.tokenizer.eos_token_id)
                out.append(self.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
        return out


mlflow.models.set_model(LBSearchModel())
