"""The Transformer of "Attention Is All You Need" as a library: torch, numpy and the standard library only.

One file per concept: `model` (the network), `loss`, `schedule`, `batching`, `training`, `search` (greedy) and
`beam_search`, `inference` (the one token-level translation path), `checkpoint`, `corpus`, `attention_maps`.
Import from the module (`from transformer.model import Transformer`): this file imports nothing, so that a
stage that needs only `transformer.corpus` does not load (and depend on) the model.
"""
