"""packing.py: boundaries, labels, positions, split/drop policies, stats, and exact resume."""

import io

import numpy as np
import pytest
import torch

from omni_train.data.chat import EncodedSample, MediaItem
from omni_train.data.packing import Document, SequencePacker, collate_packed, split_points

PAD = 0


def doc(n, key, start=1, mask=None, spans=(), positions=None):
    ids = np.arange(start, start + n, dtype=np.int64)
    mask = np.ones(n, bool) if mask is None else np.asarray(mask, bool)
    return Document(ids, mask, positions, list(spans), [f"{key}-m{i}" for i in range(len(spans))], key)


def segments(seq):
    """(key, ids, labels, loss_mask, positions) of each document in a packed sequence."""
    out = []
    cu = seq.cu_seqlens.tolist()
    for i, key in enumerate(seq.keys):
        a, b = cu[i], cu[i + 1]
        assert (seq.document_ids[a:b] == i).all()
        out.append((key, seq.input_ids[a:b], seq.labels[a:b], seq.loss_mask[a:b], seq.position_ids[:, a:b]))
    return out


def check_sequence(seq, L):
    assert seq.input_ids.shape == (L,) and seq.position_ids.shape == (3, L)
    assert seq.cu_seqlens[0] == 0 and seq.cu_seqlens[-1] == L
    used = L - seq.num_pad
    assert (seq.document_ids[used:] == -1).all() and (seq.loss_mask[used:] == 0).all()
    assert (seq.input_ids[used:] == PAD).all()


def test_documents_keep_boundaries_labels_and_positions():
    packer = SequencePacker(max_length=8, pad_id=PAD, max_open=1)
    docs = [doc(5, "a", 10, mask=[0, 0, 1, 1, 1]), doc(3, "b", 20), doc(7, "c", 30), doc(2, "d", 40)]
    seqs = list(packer.pack(docs))
    assert [s.keys for s in seqs] == [["a", "b"], ["c"], ["d"]]
    for s in seqs:
        check_sequence(s, 8)
    (_, ids, labels, mask, pos), (_, ids_b, labels_b, mask_b, pos_b) = segments(seqs[0])
    assert ids.tolist() == [10, 11, 12, 13, 14]
    assert labels.tolist() == [11, 12, 13, 14, PAD]        # next token of the same document only
    assert mask.tolist() == [0, 1, 1, 1, 0]               # target mask, shifted; last token predicts nothing
    assert pos.tolist() == [list(range(5))] * 3 and pos_b.tolist() == [[0, 1, 2]] * 3  # restart per document
    assert labels_b.tolist() == [21, 22, PAD]
    assert seqs[0].cu_seqlens.tolist() == [0, 5, 8] and seqs[1].cu_seqlens.tolist() == [0, 7, 8]
    report = packer.report()
    assert report["tokens"] == 17 and report["pad_tokens"] == 7 and report["sequences"] == 3
    assert report["pad_fraction"] == pytest.approx(7 / 24)


def test_best_fit_fills_the_tightest_open_sequence():
    packer = SequencePacker(max_length=10, pad_id=PAD, max_open=2)
    out = []
    for d in [doc(6, "a"), doc(7, "b"), doc(3, "c"), doc(4, "d")]:
        out += packer.add(d)
    # c (3) fits b's sequence (room 3) exactly -> emitted; d (4) goes with a (room 4) -> emitted
    assert [s.keys for s in out] == [["b", "c"], ["a", "d"]] and all(s.num_pad == 0 for s in out)
    assert packer.flush() == []


def test_split_points_never_cut_inside_media():
    assert split_points(20, 8, []) == [8, 16]
    assert split_points(20, 8, [(6, 10)]) == [6, 14]      # 8 is inside (6, 10): cut moves to 6
    assert split_points(20, 8, [(8, 12)]) == [8, 16]      # a cut at a span's start is fine
    assert split_points(20, 8, [(2, 13)]) is None         # a span longer than a piece
    assert split_points(8, 8, [(0, 8)]) == []


def test_split_policy_pieces_keep_labels_media_and_positions():
    packer = SequencePacker(max_length=8, pad_id=PAD, policy="split", max_open=1)
    seqs = list(packer.pack([doc(20, "long", 100, spans=[(6, 10)])]))
    pieces = [seg for s in seqs for seg in segments(s)]
    assert [len(p[1]) for p in pieces] == [6, 8, 6]
    assert torch.cat([p[1] for p in pieces]).tolist() == list(range(100, 120))
    assert pieces[0][2][-1].item() == 106 and pieces[0][3][-1].item() == 1  # a piece still predicts its next token
    assert pieces[-1][3][-1].item() == 0                                   # the document's end predicts nothing
    assert pieces[1][4][0].tolist() == list(range(6, 14))                   # the document's own positions
    assert seqs[0].media == [] and seqs[1].media == ["long-m0"] and seqs[1].media_spans == [(0, 4)]
    assert packer.stats["split_documents"] == 1 and packer.stats["pieces"] == 3


def test_unsplittable_and_drop_policy_are_counted():
    packer = SequencePacker(max_length=8, pad_id=PAD, policy="split")
    assert packer.add(doc(20, "x", spans=[(2, 13)])) == []
    assert packer.stats["dropped_unsplittable"] == 1 and packer.stats["dropped_tokens"] == 20
    dropper = SequencePacker(max_length=8, pad_id=PAD, policy="drop")
    seqs = list(dropper.pack([doc(9, "too_long"), doc(8, "fits")]))
    assert [s.keys for s in seqs] == [["fits"]]
    assert dropper.stats["dropped_documents"] == 1 and dropper.stats["dropped_tokens"] == 9
    with pytest.raises(ValueError):
        SequencePacker(8, PAD, policy="truncate")


def test_encoder_positions_are_kept():
    pos = np.stack([np.array([0, 1, 2, 2, 2, 5.5]), np.array([0, 1, 2, 2, 3, 5.5]), np.array([0, 1, 2, 3, 2, 5.5])])
    seq = list(SequencePacker(8, PAD).pack([doc(6, "mm", positions=pos)]))[0]
    assert seq.position_ids.dtype == torch.float32
    torch.testing.assert_close(seq.position_ids[:, :6], torch.tensor(pos, dtype=torch.float32))
    assert seq.position_ids[:, 6:].tolist() == [[0, 1]] * 3


def random_docs(n, seed=0, max_len=40):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(1, max_len))
        s = int(rng.integers(0, length))
        spans = [(s, min(length, s + int(rng.integers(1, 6))))] if rng.random() < 0.5 else []
        out.append(doc(length, f"d{i}", start=int(rng.integers(1, 1000)), mask=rng.random(length) < 0.7,
                       spans=spans))
    return out


def test_tokens_are_conserved_and_deterministic():
    docs = random_docs(60)
    seqs = list(SequencePacker(32, PAD, max_open=4).pack(docs))
    again = list(SequencePacker(32, PAD, max_open=4).pack(docs))
    assert all(torch.equal(a.input_ids, b.input_ids) and a.keys == b.keys for a, b in zip(seqs, again))
    recovered = {}
    for s in seqs:
        check_sequence(s, 32)
        for key, ids, *_ in segments(s):
            recovered.setdefault(key, []).append(ids)
    for d in docs:
        assert torch.cat(recovered[d.key]).tolist() == d.input_ids.tolist()


def test_resume_from_state_dict_packs_identically():
    docs = random_docs(50, seed=3)
    uninterrupted = SequencePacker(24, PAD, max_open=3)
    full = list(uninterrupted.pack(docs))
    first = SequencePacker(24, PAD, max_open=3)
    out = [s for d in docs[:23] for s in first.add(d)]
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = SequencePacker(24, PAD, max_open=3)
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    out += list(resumed.pack(docs[23:]))
    assert len(out) == len(full)
    for a, b in zip(out, full):
        for name in ("input_ids", "labels", "loss_mask", "position_ids", "document_ids", "cu_seqlens"):
            assert torch.equal(getattr(a, name), getattr(b, name))
        assert a.keys == b.keys and a.media == b.media
    assert resumed.report() == uninterrupted.report()
    with pytest.raises(ValueError):
        SequencePacker(16, PAD, max_open=3).load_state_dict(first.state_dict())


def test_collate_and_encoded_sample_input():
    sample = EncodedSample(input_ids=torch.arange(1, 7), loss_mask=torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.bool),
                           media=[MediaItem("image", "image0.jpg", (1, 4), 1, {})], key="s0")
    d = Document.from_encoded(sample)
    assert d.media_spans == [(1, 4)] and d.media[0].name == "image0.jpg"
    packer = SequencePacker(8, PAD)
    seqs = packer.pack([d, doc(4, "t")])
    batch = collate_packed(list(seqs))
    assert batch["input_ids"].shape == (2, 8) and batch["position_ids"].shape == (3, 2, 8)
    assert batch["cu_seqlens"].tolist() == [0, 6, 8, 12, 16] and batch["media"][0].name == "image0.jpg"
