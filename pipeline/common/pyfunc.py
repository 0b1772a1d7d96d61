"""The averaged model as an MLflow pyfunc model: sentences in, translations out.

    model = mlflow.pyfunc.load_model(uri)
    model.predict(["A sentence."])                      # -> ["Ein Satz."]
    model.predict(["A sentence."], params={"beam": 1})   # per-request search settings
    mlflow.pyfunc.load_model(uri, model_config={"engine": "ctranslate2", "compute_type": "int8"})  # another engine
    mlflow models serve -m URI --env-manager local -h 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d '{"inputs": ["A sentence."]}'

The model directory carries the model file and the sentencepiece model as artifacts and this project's
`pipeline/` and `transformer/` packages as code, so it loads wherever torch and sentencepiece are installed.
The engine is chosen at load time (model_config `engine`: torch | ctranslate2, and `compute_type`,
`ct2_inter_threads`, `ct2_max_batch_size`, as the decode stage's keys); CTranslate2 converts the model file at
load into a temporary folder, never into the model's artifacts, which may be a read-only store.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from dataclasses import asdict, fields
from pathlib import Path

import ctranslate2
import mlflow
import numpy as np
import pandas as pd
import sentencepiece
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from pipeline.common.engines import make_translator
from pipeline.common.translator import Translator
from transformer.inference import SearchOptions

PAPER_SEARCH = SearchOptions()  # §6.1

REPO = Path(__file__).resolve().parents[2]  # pipeline/common/ -> the repository
MODEL_NAME = "translator"
# As the decode stage's keys of the same names.
ENGINE_DEFAULTS = {"engine": "torch", "compute_type": "default", "ct2_inter_threads": 0, "ct2_max_batch_size": 0}
_PARAM_TYPES = {int: "long", float: "double"}


def signature(defaults: SearchOptions = PAPER_SEARCH) -> ModelSignature:
    """One string column in, one out; the search settings as optional per-request params."""
    params = [ParamSpec(k, _PARAM_TYPES[type(v)], v) for k, v in asdict(defaults).items()]
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(params),
    )


def as_sentences(model_input) -> list[str]:
    """Whatever pyfunc hands over (DataFrame, Series, array, list) as a list of strings."""
    if isinstance(model_input, pd.DataFrame):
        model_input = model_input.iloc[:, 0]
    if isinstance(model_input, pd.Series | np.ndarray):
        model_input = model_input.tolist()
    if isinstance(model_input, str):
        model_input = [model_input]
    return ["" if s is None else str(s) for s in model_input]


class TranslationModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        config = dict(context.model_config or {})
        self.defaults = SearchOptions(**{f.name: config[f.name] for f in fields(SearchOptions) if f.name in config})
        engine, compute_type, inter_threads, max_batch_size = (config.get(k, v) for k, v in ENGINE_DEFAULTS.items())
        ct2_folder = None
        if engine == "ctranslate2":
            ct2_folder = Path(tempfile.mkdtemp(prefix="translator-ct2-"))
            weakref.finalize(self, shutil.rmtree, ct2_folder, ignore_errors=True)
        self.translator = make_translator(
            [context.artifacts["model"]], self.defaults, engine=engine, compute_type=compute_type,
            spm_path=context.artifacts["spm"], ct2_folder=ct2_folder, inter_threads=int(inter_threads),
            max_batch_size=int(max_batch_size),
        )  # fmt: skip

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        options = SearchOptions(**{**asdict(self.defaults), **(params or {})})
        # A Translator per request (it is only a view of the shared model): concurrent requests in a
        # server may ask for different settings.
        translator = Translator(self.translator.model, self.translator.sp, options, self.translator.engine_search)
        return translator.translate(as_sentences(model_input))


def log_translation_model(
    model_file: Path, spm_file: Path, languages: dict[str, str], options: SearchOptions = PAPER_SEARCH
) -> mlflow.models.model.ModelInfo:
    """Log into the active run; returns the ModelInfo (its `model_uri` loads the model)."""
    info = mlflow.pyfunc.log_model(
        name=MODEL_NAME,
        python_model=Path(__file__),  # "models from code": nothing pickled; this file defines the model
        artifacts={"model": str(model_file), "spm": str(spm_file)},
        code_paths=[str(REPO / "pipeline"), str(REPO / "transformer")],
        # Every key a loader may override must be here (MLflow ignores the others): the search defaults and the
        # engine, which `load_model(uri, model_config=...)` or MLFLOW_PYFUNC_INFERENCE_CONFIG can change.
        model_config={**asdict(options), **ENGINE_DEFAULTS},
        signature=signature(options),
        input_example=["A sentence."],
        # Stated, not inferred: inference would load and run the model in a subprocess.
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            f"sentencepiece=={sentencepiece.__version__}",
            f"ctranslate2=={ctranslate2.__version__}",  # model_config engine: ctranslate2
            f"mlflow=={mlflow.__version__}",
        ],
        metadata={"source_lang": languages["source"], "target_lang": languages["target"]},
    )
    mlflow.set_tag("translator_uri", info.model_uri)
    return info


# Loading a "models from code" model executes this file; this names the model it defines.
mlflow.models.set_model(TranslationModel())
