"""Looking inside a model as it trains: attention grids and sample translations of a few fixed validation
sentences, logged to MLflow (the train stage at every validation, the average stage for the averaged model).

- `choose_samples`: the first `count` validation pairs whose source has 4..20 BPE tokens, so the axes stay
  readable; the same sentences for every validation of a run and for every run on the same data.
- `inspect_model`: greedy output of each (what the model would say now, at most OUTPUT_SLACK tokens longer than
  its source), then the attention maps of one teacher-forced pass over that output (`transformer.attention_maps`;
  the cached decode gives the same maps).
- `attention_figure`: one grid per layer: rows encoder self-attention, decoder self-attention, decoder-encoder
  attention; one column per head; tokens on the axes. `cross_attention_figure`: every layer's cross-attention.
  (`translate --show-attention OUT.png` draws it for one sentence from the command line.)
- `log_inspection`: the grids as MLflow images with key `attention/sentence_<i>/layer_<l>` and step = update
  (the run's "Model metrics" tab shows them with a step slider), and the translations appended to the table
  `samples.json` (update, sentence, source, reference, hypothesis): one set of rows per validation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import sentencepiece as spm
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from transformer.attention_maps import AttentionMaps, teacher_forced_maps
from transformer.batching import pad_right, source_tokens
from transformer.model import EOS_ID, Transformer
from transformer.search import greedy_search

SAMPLES_TABLE = "samples.json"
MIN_TOKENS, MAX_TOKENS = 4, 20  # BPE tokens of the source: long enough to say something, short enough to read
# The greedy output is cut this many tokens beyond its source's length (not the search's +50): a trained model's
# translations of such short sentences fit; an undertrained one's loops made grids of ~70 labels a side, unreadable,
# each taking seconds to draw (the smoke demo's train stage waited ~22 s at its end for them).
OUTPUT_SLACK = 10


@dataclass(frozen=True)
class Sample:
    source: str
    reference: str


@dataclass
class Inspection:
    """One sentence's greedy output and its maps, cropped to real tokens (no padding)."""

    sample: Sample
    hypothesis: str
    source_pieces: list[str]  # encoder positions: the source + </s>
    output_pieces: list[str]  # decoder queries: the output + </s> (query i produced output token i)
    maps: AttentionMaps  # per layer (h, T_q, T_k)

    @property
    def decoder_inputs(self) -> list[str]:
        """Decoder self-attention keys: <s> and the output read so far."""
        return ["<s>", *self.output_pieces[:-1]]


def choose_samples(
    sources: Sequence[str], references: Sequence[str], sp: spm.SentencePieceProcessor, count: int
) -> list[Sample]:
    """The first `count` pairs (corpus order) whose source has MIN_TOKENS..MAX_TOKENS BPE tokens."""
    chosen = []
    for source, reference in zip(sources, references, strict=True):
        if len(chosen) == count:
            break
        if MIN_TOKENS <= len(sp.encode(source)) <= MAX_TOKENS:
            chosen.append(Sample(source, reference))
    return chosen


@torch.no_grad()
def inspect_model(
    model: Transformer,
    sp: spm.SentencePieceProcessor,
    samples: Sequence[Sample],
    search: Callable[[list[list[int]]], list[list[int]]] | None = None,
) -> list[Inspection]:
    """The output of each sample (greedy, or `search`: source ids with eos -> output ids without) and the
    attention maps that produced it, in eval mode (the mode is restored)."""
    if not samples:
        return []
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        sources = [source_tokens(sp.encode(s.source), model.cfg.max_positions) for s in samples]
        src = pad_right(sources).to(device)  # (B, S)
        hyps = search(sources) if search is not None else greedy_search(model, src, max_len_b=OUTPUT_SLACK)
        outputs = [h + [EOS_ID] for h in hyps]
        maps = teacher_forced_maps(model, src, pad_right(outputs).to(device))
    finally:
        model.train(was_training)
    found = []
    for i, (sample, source, output) in enumerate(zip(samples, sources, outputs, strict=True)):
        S, T = len(source), len(output)
        one = maps.sentence(i)
        cropped = AttentionMaps(
            [m[:, :S, :S].float().cpu() for m in one.encoder],
            [m[:, :T, :T].float().cpu() for m in one.decoder],
            [m[:, :T, :S].float().cpu() for m in one.cross],
        )
        pieces = [sp.id_to_piece(t) for t in source], [sp.id_to_piece(t) for t in output]
        found.append(Inspection(sample, sp.decode(hyps[i]), *pieces, cropped))
    return found


def _heatmap(ax, weights: torch.Tensor, x_labels: list[str], y_labels: list[str], title: str, first: bool) -> None:
    """One head's map; the queries (y) are labelled on the first panel of a row only (the heads share them),
    which also halves the text matplotlib lays out, most of the time a grid takes."""
    ax.imshow(weights.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_title(title, fontsize=7)
    ax.set_xticks(range(len(x_labels)), x_labels, rotation=90, fontsize=5)
    if first:  # ticks without labels would still cost matplotlib a Tick object each
        ax.set_yticks(range(len(y_labels)), y_labels, fontsize=5)
    else:
        ax.set_yticks([])


def attention_figure(inspection: Inspection, layer: int, title: str) -> Figure:
    """Layer `layer` (0-based): a row per kind of attention the layer has, a column per head."""
    m, src, out = inspection.maps, inspection.source_pieces, inspection.output_pieces
    rows = []
    if layer < len(m.encoder):
        rows.append(("encoder self-attention", m.encoder[layer], src, src))
    if layer < len(m.decoder):
        rows.append(("decoder self-attention", m.decoder[layer], inspection.decoder_inputs, out))
        rows.append(("decoder-encoder attention", m.cross[layer], src, out))
    heads = rows[0][1].shape[0]
    side = 0.9 + 0.14 * max(len(src), len(out))  # inches per panel: room for one label per token
    fig = Figure(figsize=(side * heads, side * len(rows) + 0.6), dpi=100)
    axes = fig.subplots(len(rows), heads, squeeze=False)
    for r, (kind, weights, x, y) in enumerate(rows):
        for h in range(heads):
            _heatmap(axes[r][h], weights[h], x, y, f"{kind}, head {h + 1}", first=h == 0)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


def cross_attention_figure(inspection: Inspection, title: str) -> Figure:
    """Every layer's decoder-encoder attention: a row per layer, a column per head."""
    cross, src, out = inspection.maps.cross, inspection.source_pieces, inspection.output_pieces
    heads = cross[0].shape[0]
    side = 0.9 + 0.14 * max(len(src), len(out))
    fig = Figure(figsize=(side * heads, side * len(cross) + 0.6), dpi=100)
    axes = fig.subplots(len(cross), heads, squeeze=False)
    for layer, weights in enumerate(cross):
        for h in range(heads):
            _heatmap(axes[layer][h], weights[h], src, out, f"layer {layer + 1}, head {h + 1}", first=h == 0)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


def figure_pixels(fig: Figure) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a rendered figure, what `MlflowClient.log_image` takes."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def log_inspection(client: MlflowClient, run_id: str, inspections: Sequence[Inspection], update: int) -> None:
    """The attention grids (images with step = update) and the sample translations (rows of samples.json)."""
    for i, found in enumerate(inspections, start=1):
        layers = max(len(found.maps.encoder), len(found.maps.decoder))
        for layer in range(layers):
            title = f"update {update} · sentence {i} · layer {layer + 1}\n{found.sample.source}\n→ {found.hypothesis}"
            pixels = figure_pixels(attention_figure(found, layer, title))
            client.log_image(run_id, pixels, key=f"attention/sentence_{i}/layer_{layer + 1}", step=update)
    table = {
        "update": [update] * len(inspections),
        "sentence": list(range(1, len(inspections) + 1)),
        "source": [f.sample.source for f in inspections],
        "reference": [f.sample.reference for f in inspections],
        "hypothesis": [f.hypothesis for f in inspections],
    }
    client.log_table(run_id, table, artifact_file=SAMPLES_TABLE)
