"""The typed loader: paper defaults, presets that compose, and errors that name the file and key."""

import os
import subprocess
import unittest.mock as mock
from pathlib import Path

import pytest
import yaml
from dvc.utils.hydra import compose_and_dump
from pydantic import ValidationError

from pipeline.common.params import Params, ParamsError, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (REPO / "conf" / "preset").glob("*.yaml"))


def compose(tmp_path, *overrides):
    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(REPO / "conf"), None, "config", str(tmp_path), list(overrides))
    return out


def committed_params_yaml() -> str:
    """params.yaml as committed: `make demo` (a `dvc exp run -S preset=smoke`) rewrites the working copy, as
    every `dvc exp run -S` does, and the suite must pass after it. Outside a git checkout: the file as it is."""
    try:
        out = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=REPO, capture_output=True, text=True)
    except OSError:
        return (REPO / "params.yaml").read_text()
    return out.stdout if out.returncode == 0 else (REPO / "params.yaml").read_text()


def test_committed_params_yaml_is_the_composed_default(tmp_path):
    # `dvc repro` on a fresh clone must be the real WMT14 base run.
    composed = yaml.safe_load(compose(tmp_path).read_text())
    assert yaml.safe_load(committed_params_yaml()) == composed
    assert composed["preset"] == "wmt14-base"


def test_conf_defaults_equal_the_loader_defaults():
    raw = yaml.safe_load((REPO / "conf" / "config.yaml").read_text())
    raw.pop("defaults")
    assert parse_params(raw) == Params()


def test_paper_base_defaults():
    p = Params()
    assert p.bpe.vocab_size == 37000
    assert (p.train.warmup, p.train.label_smoothing, p.train.adam_betas) == (4000, 0.1, (0.9, 0.98))
    assert p.train.adam_eps == 1e-9
    assert (p.decode.beam, p.decode.alpha, p.decode.max_len_b) == (4, 0.6, 50)
    assert p.average.last == 5


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_validates(tmp_path, preset):
    params = load_params(compose(tmp_path, f"preset={preset}"))
    assert params.preset == preset


def test_required_presets_exist():
    assert {"smoke", "multi30k", "wmt14-base", "wmt14-big"} <= set(PRESETS)


def test_big_preset_changes_model_not_data(tmp_path):
    base = load_params(compose(tmp_path, "preset=wmt14-base"))
    big = load_params(compose(tmp_path, "preset=wmt14-big"))
    assert (base.data, base.bpe, base.binarise) == (big.data, big.bpe, big.binarise)
    assert big.model.arch == "big" and big.average.last == 20


def write(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_unknown_key_is_named(tmp_path):
    path = write(tmp_path, "train:\n  warmpu: 10\n")
    with pytest.raises(ParamsError, match=r"params.yaml: unknown key 'train.warmpu'"):
        load_params(path)


def test_wrong_type_is_named(tmp_path):
    path = write(tmp_path, "bpe:\n  vocab_size: lots\n")
    with pytest.raises(ParamsError, match=r"params.yaml: key 'bpe.vocab_size'.*'lots'"):
        load_params(path)


def test_out_of_range_is_named(tmp_path):
    path = write(tmp_path, "train:\n  label_smoothing: 1.5\n")
    with pytest.raises(ParamsError, match=r"key 'train.label_smoothing'"):
        load_params(path)


def test_inconsistent_values_are_named(tmp_path):
    path = write(tmp_path, "train:\n  update_tokens: 100\n  max_tokens: 200\n")
    with pytest.raises(ParamsError, match=r"key 'train'.*max_tokens"):
        load_params(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(write(tmp_path, "train: [unclosed\n"))


def test_model_overrides_only_set_keys():
    p = parse_params({"model": {"arch": "big", "dropout": 0.1}})
    assert p.model.overrides() == {"dropout": 0.1}


def test_params_are_frozen():
    with pytest.raises(ValidationError, match="frozen"):
        Params().train.warmup = 3  # type: ignore[misc]


def test_tests_run_offline():
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"


def test_accelerator_type_reaches_ray_scaling_config():
    ray_train = pytest.importorskip("ray.train")
    from pipeline.common.elastic import scaling

    p = parse_params({"train": {"workers": 8, "use_gpu": True, "accelerator_type": "H100"}})
    # No Ray cluster is needed: the cluster's resources are patched.
    with mock.patch("ray.cluster_resources", return_value={"GPU": 8.0, "CPU": 96.0}):
        cfg = scaling(p.train)
    assert isinstance(cfg, ray_train.ScalingConfig)
    assert (cfg.num_workers, cfg.use_gpu, cfg.accelerator_type) == (8, True, "H100")
    no_gpu = mock.patch("ray.cluster_resources", return_value={"CPU": 2.0})
    with no_gpu, pytest.raises(RuntimeError, match="train.use_gpu"):
        scaling(parse_params({"train": {"use_gpu": True}}).train)


def test_workers_min_max_is_elastic_and_auto_grows_to_every_gpu():
    pytest.importorskip("ray.train")
    from pipeline.common.elastic import scaling

    with mock.patch("ray.cluster_resources", return_value={"GPU": 4.0, "CPU": 64.0}):
        auto = scaling(parse_params({}).train)
        pair = scaling(parse_params({"train": {"workers": [2, 4], "resize_every_minutes": 0.5}}).train)
        fixed = scaling(parse_params({"train": {"workers": 3}}).train)
    assert auto.num_workers == (1, 4) and auto.use_gpu  # every GPU, at least one
    assert pair.num_workers == (2, 4) and pair.elastic_resize_monitor_interval_s == 30.0
    assert fixed.num_workers == 3 and not fixed.elasticity_enabled
    with mock.patch("ray.cluster_resources", return_value={"CPU": 2.0}):
        assert scaling(parse_params({}).train).num_workers == 1  # no GPU: one CPU worker
    with pytest.raises(ParamsError, match="min <= max"):
        parse_params({"train": {"workers": [3, 2]}})


@pytest.mark.parametrize("preset", ["smoke", "multi30k"])
def test_cpu_presets_give_the_same_model_on_any_host(tmp_path, preset):
    """Nothing that shapes the weights follows the wall clock: the budget is updates, checkpoints (hence what
    `average` averages) come every N updates, the cool-down follows max_updates. Snapshots for the BLEU-over-time
    curve may follow the clock: they are points of a curve, not the model."""
    params = load_params(compose(tmp_path, f"preset={preset}"))
    train, average = params.train, params.average
    assert train.max_minutes is None and train.checkpoint_every_minutes is None
    assert train.checkpoint_every_updates and train.max_updates % train.checkpoint_every_updates == 0
    assert average.last_minutes is None and average.last_share is None and average.last <= train.keep_checkpoints


def test_multi30k_budget_cooldown_and_average_follow_the_updates(tmp_path):
    train = load_params(compose(tmp_path, "preset=multi30k")).train
    average = load_params(compose(tmp_path, "preset=multi30k")).average
    assert (train.max_updates, train.cooldown, train.checkpoint_every_updates) == (6400, 0.3, 200)
    # The averaged checkpoints (updates 5,200 ... 6,400) lie in the cool-down (from update 4,480).
    first_averaged = train.max_updates - (average.last - 1) * train.checkpoint_every_updates
    assert first_averaged == 5200 and first_averaged > train.max_updates * (1 - train.cooldown)
