"""The one typed loader for `params.yaml`: every section validated before any stage does work.

Defaults are the paper's WMT14 En->De *base* setup (Vaswani et al. 2017, §5); the presets in `conf/preset/`
override them (`dvc exp run -S preset=multi30k`). An unknown key, a wrong type or an out-of-range value
raises `ParamsError` naming the file and the dotted key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PARAMS_FILE = Path("params.yaml")

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Probability = Annotated[float, Field(ge=0.0, lt=1.0)]


class ParamsError(ValueError):
    """A parameter file that cannot be used, with the file and key named."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class DataParams(Section):
    """`download`: where the parallel corpus comes from and which direction we translate."""

    dataset: str = "wmt/wmt14"  # hub id, a local folder, or a local data file
    config: str | None = "de-en"  # hub configuration name (wmt14: "de-en"); None for flat layouts
    source_lang: str = "en"
    target_lang: str = "de"
    splits: dict[Literal["train", "valid", "test"], str] = {
        "train": "train",
        "valid": "validation",
        "test": "test",
    }
    max_sentences: PositiveInt | None = None  # cap per split (None: all)

    @model_validator(mode="after")
    def _distinct_langs(self) -> DataParams:
        if self.source_lang == self.target_lang:
            raise ValueError("source_lang and target_lang must differ")
        if set(self.splits) != {"train", "valid", "test"}:
            raise ValueError("splits must name train, valid and test")
        return self


class BpeParams(Section):
    """`learn_bpe`: one joint sentencepiece BPE model over source and target (§5.1: ~37k shared tokens).

    `input_sentence_size`: training lines (source and target together) sampled to learn from. Sentencepiece holds
    them all in memory: on the WMT14-sized rehearsal corpus (tools/make_wmt_like.py, 9.0M lines, 2 shared cores,
    tools/full_size.py) 1M lines took 30 s and 1.1 GB peak, 2M 45 s and 1.6 GB, 4M 77 s and 2.8 GB, all 9.0M
    147 s and 5.6 GB, over half the 8 GB the data stages may use. The 2M default gives the same segmentation
    length as all lines (33.55 against 33.54 BPE tokens a held-out sentence) and 97% of the same pieces; the
    sample is ours, seeded by `seed`, so the model is reproducible."""

    vocab_size: Annotated[int, Field(ge=16, le=65535)] = 37000
    character_coverage: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    input_sentence_size: PositiveInt = 2_000_000  # lines sampled for training the model (see above)
    seed: int = 1


class BinariseParams(Section):
    """`binarise`: token arrays; training pairs filtered like fairseq's prepare-wmt14en2de.sh."""

    max_len: PositiveInt = 250  # BPE tokens, per side, eos excluded
    max_len_ratio: Annotated[float, Field(ge=1.0)] = 1.5
    workers: NonNegInt = 0  # 0: every core
    # Not in the paper, opt-in: BPE-dropout (Provilkov et al. 2020), sentencepiece's sampled segmentation of the
    # training pairs: > 0 writes `sampled_copies` encodings of them, each merge dropped with this probability, and
    # epoch e trains on copy (e - 1) mod sampled_copies. Valid and test stay deterministic.
    bpe_dropout: Probability = 0.0
    sampled_copies: PositiveInt = 16
    sampling_seed: NonNegInt = 1


class ModelParams(Section):
    """`train`: architecture. `arch` names a preset of `transformer.model.PRESETS`; other keys override it."""

    arch: str = "base"
    encoder_layers: PositiveInt | None = None
    decoder_layers: PositiveInt | None = None
    d_model: PositiveInt | None = None
    d_ff: PositiveInt | None = None
    heads: PositiveInt | None = None
    dropout: Probability | None = None
    # Opt-in, not the paper's (0 unless set): dropout of the attention weights and of the FFN's hidden units.
    attention_dropout: Probability | None = None
    activation_dropout: Probability | None = None

    def overrides(self) -> dict:
        return {k: v for k, v in self.model_dump(exclude={"arch"}).items() if v is not None}


class TrainParams(Section):
    """`train`: optimisation (§5.3, §5.4) and the Ray Train run."""

    # The global batch: padded tokens per side per update, whatever the number of workers (§5.1: ~25k).
    update_tokens: PositiveInt = 25_000
    max_tokens: PositiveInt = 4096  # per worker per forward pass (memory); accumulation is derived
    max_updates: PositiveInt = 100_000  # §5.2: 100k steps for base
    max_epochs: PositiveInt | None = None
    # Wall-clock budget, Ray start-up included; a resumed run goes on from the time its checkpoint carries.
    max_minutes: Annotated[float, Field(gt=0)] | None = None
    lr_factor: Annotated[float, Field(gt=0)] = 1.0
    warmup: PositiveInt = 4000
    # Share of the budget (max_minutes if set, else max_updates; whichever is nearer its end) over which the
    # lr decays linearly to 0 at the end of the run; 0: the paper's schedule to the last update.
    cooldown: Annotated[float, Field(ge=0, le=1)] = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: Annotated[float, Field(gt=0)] = 1e-9
    label_smoothing: Probability = 0.1
    clip_norm: Annotated[float, Field(ge=0)] = 0.0  # 0: no clipping (the paper clips nothing)
    seed: int = 1
    checkpoint_every_minutes: Annotated[float, Field(gt=0)] | None = 10.0  # §6.1: every 10 minutes
    checkpoint_every_updates: PositiveInt | None = None
    # Weights-only snapshots at every N minutes of the run's clock (and at the end) for the BLEU-over-time
    # curve of the `curve` stage; None: none (the curve then uses the kept checkpoints).
    snapshot_every_minutes: Annotated[float, Field(gt=0)] | None = None
    # Not in the paper: an exponential moving average of the weights with this decay, updated after every applied
    # update, saved in each checkpoint (exact resume) and averaged by the `average` stage with average.ema
    # (transformer/ema.py); None: none.
    ema_decay: Annotated[float, Field(gt=0, lt=1)] | None = None
    keep_checkpoints: PositiveInt = 20
    validate_every_updates: PositiveInt = 1000
    # Not in the paper: at every validation, the attention grids and greedy translations of this many fixed
    # validation sentences go to MLflow (pipeline/common/inspection.py), and the average stage logs them for the
    # averaged model; 0: none.
    inspect_sentences: NonNegInt = 3
    log_every_updates: PositiveInt = 100
    # N: exactly N workers. [min, max]: elastic (Ray Train's elastic scaling): start when min workers can be had,
    # grow toward max as nodes join, go on with fewer after losing some; the weights do not depend on the sizes
    # the run went through (docs/cluster.md). auto: [1, every GPU in the cluster]; without a GPU, 1 CPU worker.
    workers: Literal["auto"] | PositiveInt | tuple[PositiveInt, PositiveInt] = "auto"
    resize_every_minutes: Annotated[float, Field(gt=0)] = 1.0  # elastic: how often to look for joined nodes
    # How long the run may wait for its minimum number of workers (at start, or after losing nodes) before it fails
    # naming the resources it waits for; None: for ever.
    wait_for_workers_minutes: Annotated[float, Field(gt=0)] | None = 10.0
    use_gpu: Literal["auto"] | bool = "auto"
    cpus_per_worker: PositiveInt = 1
    accelerator_type: str | None = None  # pin GPU workers to one type, e.g. "H100" or "A100" (Ray's names)
    precision: Literal["auto", "float32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, float32 on CPU
    compile: bool = False
    max_bad_updates: PositiveInt = 10  # consecutive non-finite updates before the run stops
    storage_path: str = "runs/ray"  # Ray's storage: a local folder, a shared filesystem or s3://...
    run_name: str = "train"
    max_failures: NonNegInt = 3  # worker-group restarts (from the last checkpoint) before the run fails

    @model_validator(mode="after")
    def _consistent(self) -> TrainParams:
        if self.max_tokens > self.update_tokens:
            raise ValueError("max_tokens (per worker) must not exceed update_tokens (global)")
        if isinstance(self.workers, tuple) and self.workers[0] > self.workers[1]:
            raise ValueError(f"workers [min, max] must have min <= max, got {list(self.workers)}")
        if self.checkpoint_every_minutes is None and self.checkpoint_every_updates is None:
            raise ValueError("set checkpoint_every_minutes or checkpoint_every_updates")
        return self


class AverageParams(Section):
    """`average`: §6.1 averages the last 5 (base) or 20 (big) checkpoints, written at 10-minute intervals.

    Not in the paper: a window of training time instead of a count, so that one preset averages the same part
    of any budget. `last_minutes` keeps the checkpoints of the last M minutes of training, `last_share` those of
    the last share f of it; `last`, when also set, then caps their number. `ema`: average the chosen checkpoints'
    exponential moving averages of the weights (`train.ema_decay`) instead of their weights (`last: 1`: the
    final moving average alone)."""

    last: PositiveInt | None = 5
    last_minutes: Annotated[float, Field(gt=0)] | None = None
    last_share: Annotated[float, Field(gt=0, le=1)] | None = None
    ema: bool = False

    @model_validator(mode="after")
    def _one_rule(self) -> AverageParams:
        if self.last_minutes is not None and self.last_share is not None:
            raise ValueError("set last_minutes or last_share, not both")
        if self.last is None and self.last_minutes is None and self.last_share is None:
            raise ValueError("set last, last_minutes or last_share: which checkpoints to average")
        return self


class DecodeParams(Section):
    """`decode`: §6.1 beam search, beam 4, length penalty 0.6, maximum length source + 50."""

    split: Literal["valid", "test"] = "test"
    beam: PositiveInt = 4
    alpha: Annotated[float, Field(ge=0)] = 0.6
    max_len_a: Annotated[float, Field(ge=0)] = 1.0
    max_len_b: NonNegInt = 50
    max_tokens: PositiveInt = 8000  # source tokens per batch
    # Where decode and curve run: auto = cuda when torch sees a GPU, else cpu (bf16 autocast on cuda only).
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Which engine searches: this library's beam search, or CTranslate2 (pipeline/common/engines.py), the model
    # converted once and cached beside it. compute_type: CTranslate2's (default = the converted float32 weights;
    # int8, int8_float32, int16, float16, bfloat16, ... where the device supports them; auto = its fastest).
    engine: Literal["torch", "ctranslate2"] = "torch"
    compute_type: Literal[
        "default", "auto", "float32", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16",
        "bfloat16",
    ] = "default"  # fmt: skip
    # CTranslate2's batches of a call: inter_threads of them decoded at once, max_batch_size sentences each
    # (0 = auto: on a CPU one batch per thread up to 4, of ⌈256 / beam⌉ sentences; on a GPU the call as one).
    ct2_inter_threads: NonNegInt = 0
    ct2_max_batch_size: NonNegInt = 0
    # Not in the paper, opt-in: an ensemble (fairseq's `--path a.pt:b.pt`): the decode stage translates with these
    # model files, their probabilities averaged at every step; null: the averaged model alone. They must share the
    # sentencepiece model. DVC tracks this list, not the files' contents: keep them where they do not change
    # (e.g. `dvc get . models/average.pt --rev EXP -o ens/EXP.pt`).
    models: list[str] | None = None

    @model_validator(mode="after")
    def _models_listed(self) -> DecodeParams:
        if self.models is not None and not self.models:
            raise ValueError("models: list at least one model file, or null for the averaged model")
        return self


class CurveParams(Section):
    """`curve`: the search for the BLEU-over-time points; None takes `decode`'s value (beam 1: greedy, several
    times cheaper, for a curve of many snapshots that must not hold up the final score)."""

    beam: PositiveInt | None = None
    alpha: Annotated[float, Field(ge=0)] | None = None


class ScoreParams(Section):
    """`score`: sacreBLEU (with signature) and chrF; also the paper's tokenised, compound-split BLEU (`bleu_paper`).

    `bootstrap`: resamples of the test sentences for sacreBLEU's 95% confidence interval of BLEU (`sacrebleu
    --confidence`; 1,000 take ~0.5 s on 1,000 sentences); 0 or 1 computes none.
    `paper_reference`: a file of already tokenised references, line-aligned with the decoded split (Google's
    hand-tweaked newstest2014.tok.de, as the paper's get_ende_bleu.sh read it), for `bleu_paper` only; null:
    the raw references, tokenised like the hypotheses. DVC tracks this key, not the file's contents."""

    tokenize: str = "13a"
    bootstrap: NonNegInt = 1000
    paper_reference: str | None = None


class MlflowParams(Section):
    """Where runs are recorded; `MLFLOW_TRACKING_URI` in the environment wins over `tracking_uri`."""

    experiment: str = "transformer-wmt14"
    tracking_uri: str | None = None  # None: sqlite:///<repo>/mlflow.db with artifacts in <repo>/mlruns


class Params(Section):
    preset: str = "wmt14-base"
    data: DataParams = DataParams()
    bpe: BpeParams = BpeParams()
    binarise: BinariseParams = BinariseParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    average: AverageParams = AverageParams()
    decode: DecodeParams = DecodeParams()
    curve: CurveParams = CurveParams()
    score: ScoreParams = ScoreParams()
    mlflow: MlflowParams = MlflowParams()


def _describe(path: Path, error: ValidationError) -> str:
    lines = []
    for e in error.errors():
        key = ".".join(str(part) for part in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key '{key}'")
        else:
            got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
            lines.append(f"{path}: key '{key}': {e['msg']}{got}")
    return "\n".join(lines)


def parse_params(raw: object, path: Path | str = PARAMS_FILE) -> Params:
    """Validate an already-read mapping; `path` is only used to name the source in errors."""
    path = Path(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(_describe(path, e)) from None


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read and validate the whole file; every stage calls this before doing any work."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found (run from the repository root)") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    return parse_params(raw, path)
