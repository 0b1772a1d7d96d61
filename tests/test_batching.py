"""Token-budget batching: budgets hold, every sentence appears once per epoch, the order is a pure function of
(seed, epoch), worker shards partition the global batch whatever W, and padding stays small on Multi30k."""

import json
import random

import numpy as np
import pytest
import torch
from conftest import MULTI30K

from transformer.batching import (
    BatchPlan,
    PackedCorpus,
    Position,
    collate,
    cut_batches,
    fixed_batches,
    length_order,
    pad_right,
    padding_fraction,
    source_tokens,
    translation_batches,
)
from transformer.model import BOS_ID, EOS_ID, PAD_ID


def lengths(n=500, seed=0):
    rng = np.random.default_rng(seed)
    src = rng.integers(2, 40, n)
    tgt = np.clip(src + rng.integers(-5, 6, n), 2, None)
    return src, tgt


def test_every_batch_respects_its_budget_counting_padding():
    src, tgt = lengths()
    sizes = np.maximum(src, tgt)
    for b in cut_batches(length_order(src, tgt, np.random.default_rng(1)), sizes, 300):
        assert len(b) * sizes[b].max() <= 300
        assert len(b) >= 1


def test_greedy_cut_is_maximal():
    # Equal lengths 10 and budget 35: 3 sentences per batch (cost 30), the 4th would cost 40.
    sizes = np.full(10, 10)
    batches = cut_batches(np.arange(10), sizes, 35)
    assert [len(b) for b in batches] == [3, 3, 3, 1]


def test_length_order_is_the_three_key_sort_whichever_path_sorts():
    # By max(src, tgt), then tgt, then a random tie-break: packed into one int64 key when the keys fit, else
    # np.lexsort (lengths of 2^40 do not fit). Both must give the order that the plain lexsort defines.
    src, tgt = lengths(2000, seed=5)
    for scale in (1, 2**40):
        s, t = src * scale, tgt * scale
        tiebreak = np.random.default_rng(7).permutation(len(s))
        expected = np.lexsort((tiebreak, t, np.maximum(s, t)))
        assert length_order(s, t, np.random.default_rng(7)).tolist() == expected.tolist()


def test_greedy_cut_of_any_order_equals_the_cut_by_definition():
    # The greedy rule spelled out one sentence at a time: extend the batch while n × max(sizes) fits.
    src, tgt = lengths(700, seed=6)
    sizes = np.maximum(src, tgt)
    for order in (np.random.default_rng(8).permutation(700), length_order(src, tgt, np.random.default_rng(9))):
        expected, batch = [], []
        for i in order.tolist():
            if batch and (len(batch) + 1) * max(sizes[batch + [i]]) > 120:
                expected.append(batch)
                batch = []
            batch.append(i)
        expected.append(batch)
        assert [b.tolist() for b in cut_batches(order, sizes, 120)] == expected


def test_too_long_sentence_is_named():
    with pytest.raises(ValueError, match="sentence 2 has 50 tokens, more than max_tokens=40"):
        cut_batches(np.arange(3), np.array([3, 4, 50]), 40)


def test_epoch_covers_every_sentence_once_and_global_batches_fit_the_update_budget():
    src, tgt = lengths()
    plan = BatchPlan(src, tgt, update_tokens=1000, max_tokens=300, seed=3)
    assert plan.micro_per_update == 4 and plan.micro_tokens == 250
    batches = plan.epoch(1)
    seen = np.concatenate([m for g in batches for m in g])
    assert sorted(seen.tolist()) == list(range(len(src)))
    sizes = np.maximum(src, tgt)
    for g in batches:
        assert 1 <= len(g) <= 4
        assert sum(len(m) * sizes[m].max() for m in g) <= 1000


def test_order_is_a_pure_function_of_seed_and_epoch():
    src, tgt = lengths()

    def flat(plan, epoch):
        return [m.tolist() for g in plan.epoch(epoch) for m in g]

    a, b = BatchPlan(src, tgt, 1000, 300, seed=3), BatchPlan(src, tgt, 1000, 300, seed=3)
    assert flat(a, 2) == flat(b, 2)
    assert flat(a, 1) != flat(a, 2)
    assert flat(a, 1) != flat(BatchPlan(src, tgt, 1000, 300, seed=4), 1)


def test_with_copies_epoch_e_covers_copy_e_minus_1_mod_k_once():
    # Three encodings of the same 200 pairs back to back (BPE-dropout): each epoch takes one, in turn.
    parts = [lengths(200, seed) for seed in (0, 1, 2)]
    src, tgt = (np.concatenate([p[side] for p in parts]) for side in (0, 1))
    plan = BatchPlan(src, tgt, 1000, 300, seed=3, copies=3)

    def rows(epoch):
        return sorted(np.concatenate([m for g in plan.epoch(epoch) for m in g]).tolist())

    for epoch, copy in ((1, 0), (2, 1), (3, 2), (4, 0), (5, 1)):
        assert rows(epoch) == list(range(200 * copy, 200 * (copy + 1))), epoch
    sizes = np.maximum(src, tgt)
    assert all(sum(len(m) * sizes[m].max() for m in g) <= 1000 for g in plan.epoch(2))
    # One copy alone is batched as a plan of that copy alone would batch it, offset to its rows.
    alone = BatchPlan(*parts[1], 1000, 300, seed=3)
    assert [[(m + 200).tolist() for m in g] for g in alone.epoch(2)] == [[m.tolist() for m in g] for g in plan.epoch(2)]
    with pytest.raises(ValueError, match="601 training pairs cannot hold 3 copies"):
        BatchPlan(np.append(src, 5), np.append(tgt, 5), 1000, 300, copies=3)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_shards_partition_each_global_batch_whatever_the_world_size(world_size):
    src, tgt = lengths()
    plan = BatchPlan(src, tgt, 1000, 300, seed=1)
    assert plan.accumulation(world_size) == -(-4 // world_size)
    for g in plan.epoch(1)[:5]:
        shards = [plan.shard(g, r, world_size) for r in range(world_size)]
        assert all(len(s) == plan.accumulation(world_size) for s in shards)
        real = [m.tolist() for s in shards for m in s if m is not None]
        assert sorted(real) == sorted(m.tolist() for m in g)


def test_positions_walk_through_epochs():
    src, tgt = lengths(50)
    plan = BatchPlan(src, tgt, 400, 200, seed=1)
    n = len(plan.epoch(1))
    pos = Position()
    for _ in range(n):
        pos = plan.next_position(pos)
    assert pos == Position(2, 0)
    assert plan.target_tokens(plan.epoch(1)[0]) == sum(int(tgt[m].sum()) for m in plan.epoch(1)[0])


def test_target_tokens_is_the_loss_denominator_of_the_collated_batches():
    # Every rank divides its loss sums by target_tokens (no communication): it must count exactly the non-pad
    # targets that collate hands to the loss.
    rng = np.random.default_rng(4)

    def sentence(longest: int) -> list[int]:
        return rng.integers(4, 50, rng.integers(1, longest)).tolist() + [EOS_ID]

    pairs = [(sentence(12), sentence(15)) for _ in range(60)]
    corpus = PackedCorpus.from_pairs(pairs)
    plan = BatchPlan([len(s) for s, _ in pairs], [len(t) for _, t in pairs], 120, 60, seed=2)
    for global_batch in plan.epoch(1):
        collated = sum(int(collate(corpus, m).tgt_out.ne(PAD_ID).sum()) for m in global_batch)
        assert plan.target_tokens(global_batch) == collated


def whitespace_lengths(path):
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return (np.array([len(r[k].split()) + 1 for r in rows]) for k in ("en", "de"))


@pytest.mark.skipif(not (MULTI30K / "train.jsonl").exists(), reason="Multi30k not available")
def test_padding_under_five_percent_on_multi30k():
    # Whitespace tokens + eos stand in for BPE tokens (BPE lengths are longer and pad proportionally less).
    src, tgt = whitespace_lengths(MULTI30K / "train.jsonl")
    plan = BatchPlan(src, tgt, update_tokens=4096, max_tokens=4096, seed=1)
    micro = [m for g in plan.epoch(1) for m in g]
    assert padding_fraction(micro, src, tgt) <= 0.05
    assert padding_fraction(fixed_batches(src, tgt, 4096), src, tgt) <= 0.05


def test_padding_fraction_by_hand():
    # One batch: src lengths 2, 4 (8 slots, 6 real); tgt 3, 3 (6 slots, 6 real): 2 pads of 14.
    assert padding_fraction([np.array([0, 1])], [2, 4], [3, 3]) == pytest.approx(2 / 14)


def test_collate_shifts_target_behind_bos_and_pads():
    corpus = PackedCorpus.from_pairs([([5, 6, EOS_ID], [7, EOS_ID]), ([8, EOS_ID], [9, 10, 11, EOS_ID])])
    b = collate(corpus, np.array([0, 1]))
    assert b.src.tolist() == [[5, 6, EOS_ID], [8, EOS_ID, PAD_ID]]
    assert b.tgt_out.tolist() == [[7, EOS_ID, PAD_ID, PAD_ID], [9, 10, 11, EOS_ID]]
    assert b.tgt_in.tolist() == [[BOS_ID, 7, PAD_ID, PAD_ID], [BOS_ID, 9, 10, 11]]
    assert b.src.dtype == torch.long


def test_packed_corpus_round_trips_through_arrays():
    pairs = [([5, EOS_ID], [6, 7, EOS_ID]), ([8, 9, EOS_ID], [EOS_ID])]
    corpus = PackedCorpus.from_arrays(PackedCorpus.from_pairs(pairs).to_arrays())
    assert len(corpus) == 2
    assert corpus.src_lengths.tolist() == [2, 3] and corpus.tgt_lengths.tolist() == [3, 1]
    assert [a.tolist() for a in corpus[1]] == [[8, 9, EOS_ID], [EOS_ID]]


def greedy_cut(lengths, max_tokens):
    """The translation batching the decode stage had before it moved into the library: longest first, a batch
    closed when one more sentence would put sentences × longest over the budget."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current, longest = [], [], 0
    for i in order:
        longest = max(longest, lengths[i])
        if current and longest * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest = [], lengths[i]
        current.append(i)
    return batches + ([current] if current else [])


def test_translation_batches_cover_every_index_once_within_the_budget():
    rng = random.Random(0)
    lengths = [rng.randint(1, 30) for _ in range(200)]
    batches = [b.tolist() for b in translation_batches(lengths, max_tokens=60)]
    assert sorted(i for b in batches for i in b) == list(range(200))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 60
    # Sorted by length: each batch's longest is at most the previous batch's shortest.
    for prev, nxt in zip(batches, batches[1:], strict=False):
        assert max(lengths[i] for i in nxt) <= min(lengths[i] for i in prev)
    assert batches == greedy_cut(lengths, 60)


def test_a_sentence_longer_than_the_translation_budget_gets_its_own_batch():
    assert [b.tolist() for b in translation_batches([5, 50, 5], max_tokens=10)] == [[1], [0, 2]]
    assert [b.tolist() for b in translation_batches([50, 60], max_tokens=10)] == [[1], [0]]
    with pytest.raises(ValueError, match="max_tokens=10"):
        cut_batches(np.arange(2), np.array([5, 50]), 10)  # training: the filter should have caught it


def test_source_tokens_cap_the_source_and_end_in_eos():
    assert source_tokens([7, 8, 9], max_positions=8) == [7, 8, 9, EOS_ID]
    assert source_tokens(list(range(10, 20)), max_positions=4) == [10, 11, 12, EOS_ID]


def test_pad_right_pads_each_row_to_the_longest():
    out = pad_right([[5, 6, 7], [8], np.array([9, 10])])
    assert out.tolist() == [[5, 6, 7], [8, PAD_ID, PAD_ID], [9, 10, PAD_ID]] and out.dtype == torch.long
