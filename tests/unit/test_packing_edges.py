"""Packing at its edges: pre-training blocks are the documents joined with EOS and cut, the
same however the documents arrive in batches (empty documents, a document's EOS falling on
a block boundary, the tail kept for the next batch); SFT rows hold whole conversations with
their EOS, never one cut across rows."""

from __future__ import annotations

import numpy as np
import pytest

from raylm.chat_data import pack_conversations
from raylm.packing import BlockPacker

EOS, PAD = 99, 98


def _feed(packer: BlockPacker, docs: list[list[int]], cuts: list[int]):
    """Blocks and their sources, adding `docs` in batches ending at `cuts`."""
    blocks, sources, start = [], [], 0
    for end in [*cuts, len(docs)]:
        chunk = docs[start:end]
        flat = np.array([t for d in chunk for t in d], dtype=np.int32)
        offsets = np.concatenate([[0], np.cumsum([len(d) for d in chunk])]).astype(np.int32)
        blocks += packer.add(flat, offsets, np.arange(start, end)).tolist()
        sources += packer.last_sources
        start = end
    return blocks, sources


@pytest.mark.parametrize("seed", range(20))
def test_blocks_are_the_joined_documents_cut_whatever_the_batches(seed):
    rng = np.random.default_rng(seed)
    block_len = int(rng.integers(1, 12))
    docs = [rng.integers(0, 50, int(rng.integers(0, 15))).tolist() for _ in range(int(rng.integers(1, 25)))]
    joined = [t for d in docs for t in [*d, EOS]]
    owner = [i for i, d in enumerate(docs) for _ in range(len(d) + 1)]  # each token's document
    n = len(joined) // block_len
    cuts = sorted(set(rng.integers(0, len(docs) + 1, 4).tolist()))
    packer = BlockPacker(block_len, EOS)
    blocks, sources = _feed(packer, docs, cuts)
    assert blocks == [joined[i * block_len:(i + 1) * block_len] for i in range(n)]
    assert sources == [tuple(sorted(set(owner[i * block_len:(i + 1) * block_len]))) for i in range(n)]
    assert packer.buf.tolist() == joined[n * block_len:]  # the tail waits: nothing dropped mid-stream
    assert n * block_len + len(packer.buf) == sum(len(d) + 1 for d in docs)


def test_an_eos_on_the_block_boundary_stays_in_the_stream():
    packer = BlockPacker(4, EOS)
    blocks, _ = _feed(packer, [[1, 2, 3, 4], [5, 6, 7]], [1])
    assert blocks == [[1, 2, 3, 4], [EOS, 5, 6, 7]]  # the first document's EOS opens the next block
    assert packer.buf.tolist() == [EOS]
    blocks, _ = _feed(BlockPacker(4, EOS), [[1, 2, 3], [], [5, 6]], [])
    assert blocks == [[1, 2, 3, EOS], [EOS, 5, 6, EOS]]  # an empty document is its EOS alone


def test_sft_rows_hold_whole_conversations_in_order():
    rng = np.random.default_rng(0)
    width = 16
    convs = []
    for i in range(60):
        n = int(rng.integers(2, width + 1))  # up to a whole row, EOS included
        ids = [i % 90] * (n - 1) + [EOS]
        convs.append((ids, [False] + [True] * (n - 2) + [False]))
    rows = list(pack_conversations(convs, width, PAD))
    got = []
    for ids, mask in rows:
        assert ids.shape == mask.shape == (width,)
        used = len(ids) - int(np.argmax(ids[::-1] != PAD)) if (ids != PAD).any() else 0
        assert (ids[used:] == PAD).all() and not mask[used:].any() and ids[used - 1] == EOS
        parts = np.split(ids[:used], np.flatnonzero(ids[:used] == EOS)[:-1] + 1)
        got += [p.tolist() for p in parts]
    assert got == [c for c, _ in convs]  # each conversation once, whole, with its EOS, in order
    assert sum(int(m.sum()) for _, m in rows) == sum(sum(m) for _, m in convs)
    assert len(list(pack_conversations([([1] * (width - 1) + [EOS], [True] * width)], width, PAD))) == 1
