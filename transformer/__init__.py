"""The Transformer of "Attention Is All You Need" as a library: torch, numpy and the standard library only."""

from transformer.model import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    PRESETS,
    UNK_ID,
    EncoderOut,
    Transformer,
    TransformerConfig,
    make_config,
)

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "PRESETS",
    "UNK_ID",
    "EncoderOut",
    "Transformer",
    "TransformerConfig",
    "make_config",
]
