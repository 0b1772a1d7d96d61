"""The exported MarianMTModel is an independent implementation of the same function: equal logits, before and
after a save_pretrained/from_pretrained round trip, and a tokenizer that yields our ids."""

import pytest
import torch

pytest.importorskip("transformers")

from pipeline.commands.export_marian import main, marian_permutation, to_marian  # noqa: E402
from transformer.checkpoint import save_model  # noqa: E402
from transformer.model import Transformer, make_config  # noqa: E402

V = 53


def _model(arch: str = "tiny") -> Transformer:
    torch.manual_seed(0)
    model = Transformer(make_config(arch, V, max_positions=64)).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so a mis-mapped vector cannot hide
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
        # Training moves the pad row through the tied output projection, so a trained one is not zero.
        model.embed.weight[model.cfg.pad_id].normal_(0.0, model.cfg.d_model**-0.5)
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, V, (3, 9), generator=g)
    src[0, 6:] = 0  # padded source rows exercise the attention mask
    src[2, 4:] = 0
    tgt_in = torch.randint(4, V, (3, 7), generator=g)
    tgt_in[:, 0] = 2  # bos
    return src, tgt_in


def _marian_logits(marian, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return marian(input_ids=src, attention_mask=src.ne(0), decoder_input_ids=tgt_in).logits


def test_permutation_puts_sin_first_then_cos():
    assert marian_permutation(6).tolist() == [0, 2, 4, 1, 3, 5]
    with pytest.raises(ValueError, match="even"):
        marian_permutation(5)


@pytest.mark.parametrize("arch", ["tiny", "tiny-wu"])
def test_marian_gives_our_logits(arch):
    model = _model(arch)
    src, tgt_in = _batch()
    marian = to_marian(model)
    cfg = marian.config
    assert (cfg.activation_function, cfg.scale_embedding, cfg.share_encoder_decoder_embeddings) == ("relu", True, True)
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.decoder_start_token_id) == (0, 3, 2)
    assert torch.count_nonzero(marian.final_logits_bias) == 0
    with torch.no_grad():
        ours = model(src, tgt_in)
    torch.testing.assert_close(_marian_logits(marian, src, tgt_in), ours, atol=1e-4, rtol=0)


def test_saved_folder_reloads_to_the_same_function(tmp_path):
    from transformers import MarianMTModel

    model = _model()
    src, tgt_in = _batch()
    to_marian(model).save_pretrained(tmp_path)
    reloaded = MarianMTModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ours = model(src, tgt_in)
    # from_pretrained rebuilds Marian's own position table: the permuted hidden axis must match it.
    torch.testing.assert_close(_marian_logits(reloaded, src, tgt_in), ours, atol=1e-4, rtol=0)


def _train_spm(tmp_path):
    import sentencepiece as spm

    lines = ["A man is riding a bicycle down the street.", "Ein Mann fährt mit dem Fahrrad die Straße entlang."]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines * 20), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "spm"), vocab_size=V, model_type="bpe",
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    return spm.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))


def test_cli_writes_model_and_tokenizer_with_our_ids(tmp_path):
    from transformers import AutoTokenizer, MarianMTModel

    sp = _train_spm(tmp_path)
    torch.manual_seed(0)
    model = Transformer(make_config("tiny", sp.get_piece_size(), max_positions=64)).eval()
    save_model(tmp_path / "model.pt", model)
    main([str(tmp_path / "model.pt"), "--out", str(tmp_path / "hf"), "--spm", str(tmp_path / "spm.model")])

    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    sentence = "A man is riding down the street."
    ids = tok(sentence).input_ids
    assert ids == sp.encode(sentence) + [3]  # binarise's convention: pieces then eos, no bos
    assert tok.decode(ids, skip_special_tokens=True) == sentence
    assert MarianMTModel.from_pretrained(tmp_path / "hf").config.vocab_size == sp.get_piece_size()


def test_cli_refuses_a_non_model_file(tmp_path):
    bogus = tmp_path / "notes.pt"
    bogus.write_text("hello")
    with pytest.raises(ValueError, match="notes.pt"):
        main([str(bogus), "--out", str(tmp_path / "hf")])
    assert not (tmp_path / "hf").exists()
