"""Looking inside a model: the fixed validation sentences, their greedy output and attention maps, the grids
drawn with tokens on the axes, what reaches MLflow, and `translate --show-attention`."""

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import sentencepiece as spm
import torch
from helpers_eval import make_workspace, mlflow_store

from pipeline.common.inspection import (
    MAX_TOKENS,
    MIN_TOKENS,
    OUTPUT_SLACK,
    SAMPLES_TABLE,
    Sample,
    attention_figure,
    choose_samples,
    cross_attention_figure,
    inspect_model,
    log_inspection,
)
from pipeline.common.translator import Translator
from transformer.inference import SearchOptions
from transformer.model import EOS_ID
from transformer.search import greedy_search

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    model = make_workspace(root)
    sp = spm.SentencePieceProcessor(model_file=str(root / "data" / "bpe" / "spm.model"))
    return root, model, sp


def test_the_samples_are_the_first_readable_validation_pairs_in_corpus_order(workspace):
    _, _, sp = workspace
    short, long = "A.", " ".join(["A small brown dog runs across the green field."] * 3)
    ok = ["A man is walking.", "Two dogs play."]
    assert len(sp.encode(short)) < MIN_TOKENS and len(sp.encode(long)) > MAX_TOKENS
    assert all(MIN_TOKENS <= len(sp.encode(s)) <= MAX_TOKENS for s in ok)
    sources = [short, ok[0], long, ok[1], "A woman reads a book."]
    refs = [f"ref {i}" for i in range(len(sources))]
    assert choose_samples(sources, refs, sp, 2) == [Sample(ok[0], "ref 1"), Sample(ok[1], "ref 3")]
    assert len(choose_samples(sources, refs, sp, 10)) == 3  # fewer readable ones than asked


def test_inspection_gives_the_greedy_output_and_maps_cropped_to_its_tokens(workspace):
    _, model, sp = workspace
    samples = [Sample("A man is walking on the beach.", "x"), Sample("Two children play.", "y")]
    model.train()
    found = inspect_model(model, sp, samples)
    assert model.training  # the mode is restored
    for f, sample in zip(found, samples, strict=True):
        ids = sp.encode(sample.source) + [EOS_ID]
        [greedy] = greedy_search(model.eval(), torch.tensor([ids]), max_len_b=OUTPUT_SLACK)
        assert len(greedy) <= len(ids) + OUTPUT_SLACK
        model.train()
        assert f.hypothesis == sp.decode(greedy)
        S, T = len(ids), len(greedy) + 1
        assert f.source_pieces == [sp.id_to_piece(t) for t in ids] and f.source_pieces[-1] == "</s>"
        assert len(f.output_pieces) == T and f.decoder_inputs[0] == "<s>"
        heads = model.cfg.heads
        assert [m.shape for m in f.maps.encoder] == [(heads, S, S)] * model.cfg.encoder_layers
        assert [m.shape for m in f.maps.decoder] == [(heads, T, T)] * model.cfg.decoder_layers
        assert [m.shape for m in f.maps.cross] == [(heads, T, S)] * model.cfg.decoder_layers
        for m in (*f.maps.encoder, *f.maps.decoder, *f.maps.cross):  # cropping removed no real key
            torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]))


def test_a_layer_grid_has_a_row_per_kind_a_column_per_head_and_tokens_on_the_axes(workspace):
    _, model, sp = workspace
    [found] = inspect_model(model, sp, [Sample("A man is walking on the beach.", "x")])
    fig = attention_figure(found, 0, "title")
    axes = fig.get_axes()
    assert len(axes) == 3 * model.cfg.heads
    enc, dec, cross = axes[0], axes[model.cfg.heads], axes[2 * model.cfg.heads]
    labels = lambda ticks: [t.get_text() for t in ticks]  # noqa: E731
    assert labels(enc.get_xticklabels()) == labels(enc.get_yticklabels()) == found.source_pieces
    assert labels(dec.get_xticklabels()) == found.decoder_inputs
    assert labels(dec.get_yticklabels()) == found.output_pieces
    assert labels(cross.get_xticklabels()) == found.source_pieces
    assert labels(cross.get_yticklabels()) == found.output_pieces
    assert cross.get_title() == "decoder-encoder attention, head 1" and "head 2" in axes[-1].get_title()
    assert len(cross_attention_figure(found, "t").get_axes()) == model.cfg.decoder_layers * model.cfg.heads


def test_mlflow_gets_a_stepped_image_per_sentence_and_layer_and_the_table_grows_per_validation(workspace):
    _, model, sp = workspace
    mlflow.set_tracking_uri(mlflow_store())
    client = mlflow.MlflowClient()
    experiment = client.create_experiment(f"inspect-{id(workspace)}")
    run_id = client.create_run(experiment).info.run_id
    samples = [Sample("A man is walking on the beach.", "r1"), Sample("Two children play.", "r2")]
    for update in (7, 9):
        log_inspection(client, run_id, inspect_model(model, sp, samples), update)
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    for update in (7, 9):
        for sentence in (1, 2):
            key = f"images/attention~sentence_{sentence}~layer_1+step+{update}+"
            assert [p for p in images if p.startswith(key) and p.endswith(".png")], key
    table = json.loads(Path(client.download_artifacts(run_id, SAMPLES_TABLE)).read_text())
    assert table["columns"] == ["update", "sentence", "source", "reference", "hypothesis"]
    assert [row[:4] for row in table["data"]] == [
        [7, 1, samples[0].source, "r1"],
        [7, 2, samples[1].source, "r2"],
        [9, 1, samples[0].source, "r1"],
        [9, 2, samples[1].source, "r2"],
    ]


def test_translate_show_attention_draws_one_sentence(workspace, tmp_path):
    root, _, _ = workspace
    from pipeline.average import average
    from pipeline.common.params import AverageParams

    model_file = tmp_path / "average.pt"
    average(root / "models" / "checkpoints", root / "data" / "bpe", model_file, AverageParams(last=1), {})
    png = tmp_path / "attention.png"
    cmd = [sys.executable, "-m", "pipeline.commands.translate", "--model", str(model_file), "--beam", "2"]
    out = subprocess.run([*cmd, "--show-attention", str(png)], input="A man is walking.\n", cwd=REPO,
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert png.read_bytes()[:4] == b"\x89PNG"
    options = SearchOptions(beam=2, alpha=0.6)
    expected = Translator.from_file(model_file, options, device="cpu").translate(["A man is walking."])
    assert out.stdout.splitlines() == expected  # the beam search's translation, not the greedy one
    two = subprocess.run([*cmd, "--show-attention", str(tmp_path / "b.png")], input="One.\nTwo.\n", cwd=REPO,
                         capture_output=True, text=True)  # fmt: skip
    assert two.returncode != 0 and "one sentence; got 2" in two.stderr
    assert not (tmp_path / "b.png").exists()
