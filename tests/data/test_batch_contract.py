"""The batch contract (omni_train/data/batch.py) on real shards: every key present and typed, packed
batches reach attention as document boundaries (PackedSeqParams, no dense mask), to_device moves the
towers' inputs with the tokens and leaves their sizes on the host, and a missing key is an error."""

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from omni_train.config import compose
from omni_train.data import shards
from omni_train.data.batch import MediaInputs, MediaSizes, ShardBatch, shard_batch, to_device
from omni_train.data.packing import collate_packed


@pytest.fixture
def synth(synth_shards):
    """The session's synthetic shards (tests/conftest.py): ROOT/good, ROOT/tok; read only."""
    return synth_shards


def _cfg(root):
    return OmegaConf.to_object(compose([
        "recipe=tiny/shards_pretrain", f"data.datasets=[{{path: {root / 'good'}}}]",
        f"data.tokenizer={root / 'tok'}", "trainer.seq_length=256"]))


def _source(cfg):
    t = cfg.trainer
    return shards.ShardSource(cfg.data, t.seq_length, t.micro_batch_size, 2, dp_rank=0, dp_size=1)


def _batch_with_media(source, kind="pixel_values"):
    for _ in range(20):
        for batch in source.next_microbatches():
            if batch["media"][kind] is not None:
                return batch
    pytest.fail(f"no micro-batch with {kind} in 20 steps")


def test_every_key_present_and_typed(synth):
    cfg = _cfg(synth)
    batch = _source(cfg).next_microbatches()[0]
    assert set(batch) == set(ShardBatch.__annotations__)
    assert set(batch["media"]) == set(MediaInputs.__annotations__)
    assert set(batch["media_sizes"]) == set(MediaSizes.__annotations__)
    b, length = cfg.trainer.micro_batch_size, cfg.trainer.seq_length
    for key in ("input_ids", "labels", "loss_mask", "document_ids", "modality_ids"):
        assert batch[key].shape == (b, length), key
    assert batch["position_ids"].shape == (3, b, length)
    cu = batch["cu_seqlens"]
    assert cu.dtype == torch.int32 and int(cu[0]) == 0 and int(cu[-1]) == b * length
    assert isinstance(batch["max_seqlen"], int) and batch["max_seqlen"] == int((cu[1:] - cu[:-1]).max())
    for key, size in batch["media_sizes"].items():  # the same host tensors as the media's
        assert size is batch["media"][key]


def test_shard_batches_reach_attention_as_document_boundaries(synth, megatron_world1, monkeypatch):
    """At cp=1 the stage's forward on a ShardSource batch gives every attention layer the packer's
    cu_seqlens as PackedSeqParams and no [B, 1, L, L] mask."""
    from omni_train.models.common.attention import SDPAttention
    from omni_train.stages import text_pretrain

    cfg = _cfg(synth)
    packed = []
    monkeypatch.setattr(shards, "collate_packed", lambda seqs: packed.append(collate_packed(seqs)) or packed[-1])
    batch = _source(cfg).next_microbatches()[0]
    seen = []
    original = SDPAttention.forward

    def recording(self, query, key, value, attention_mask, *args, **kwargs):
        seen.append((attention_mask, kwargs.get("packed_seq_params")))
        return original(self, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setattr(SDPAttention, "forward", recording)
    env = SimpleNamespace(device=torch.device("cpu"), dp_rank=0, dp_size=1)
    model = text_pretrain.build_model(cfg, env, torch.float32)
    per_token_loss, _ = text_pretrain.forward(model, to_device(batch, env.device))
    assert per_token_loss.shape == batch["input_ids"].shape
    assert len(seen) == cfg.model.thinker.num_layers
    for mask, params in seen:
        assert mask is None
        assert type(params).__name__ == "PackedSeqParams" and params.qkv_format == "sbhd"
        assert torch.equal(params.cu_seqlens_q, packed[0]["cu_seqlens"]) and params.cu_seqlens_kv is params.cu_seqlens_q
        assert params.max_seqlen_q == packed[0]["max_seqlen"]
    assert len(packed[0]["cu_seqlens"]) > cfg.trainer.micro_batch_size + 1  # rows hold several documents


def test_to_device_moves_media_and_keeps_sizes_on_host(synth):
    batch = _batch_with_media(_source(_cfg(synth)))
    moved = to_device(batch, torch.device("meta"))
    assert moved.keys() == batch.keys()
    for key, value in batch.items():
        if torch.is_tensor(value):
            assert moved[key].device.type == "meta", key
    assert moved["media"]["pixel_values"].device.type == "meta"
    for key, value in batch["media"].items():
        assert (moved["media"][key] is None) == (value is None), key
        if value is not None:
            assert moved["media"][key].device.type == "meta" and moved["media"][key].shape == value.shape, key
    assert moved["media_sizes"] is batch["media_sizes"] and batch["media_sizes"]["image_grid_thw"].device.type == "cpu"
    assert moved["keys"] == batch["keys"] and moved["max_seqlen"] == batch["max_seqlen"]
    assert batch["input_ids"].device.type == "cpu"  # the source's batch is left as it was


def test_missing_or_unknown_key_is_an_error(synth):
    from omni_train.models.common.attention import document_attention

    seqs = [_source(_cfg(synth))._next_sequence() for _ in range(2)]
    packed = collate_packed(seqs)
    assert set(shard_batch(packed)) == set(ShardBatch.__annotations__)
    with pytest.raises(KeyError, match="cu_seqlens"):
        shard_batch({k: v for k, v in packed.items() if k != "cu_seqlens"})
    with pytest.raises(KeyError, match="num_tokens"):
        shard_batch({**packed, "num_tokens": 3})
    # attention refuses a packed batch without its boundaries rather than building the dense mask
    with pytest.raises(KeyError, match="max_seqlen"):
        document_attention({"document_ids": packed["document_ids"], "cu_seqlens": packed["cu_seqlens"]})


def test_audio_chunks_gathered_on_device_equal_the_plan_on_host():
    """prepare_media's audio plan reads only sizes on the host and gathers the features' chunks where
    they are: the same padded chunks (bitwise) as tower_plan.audio_plan chunking the features itself."""
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeAudioEncoderConfig

    from omni_train.models.thinker import tower_plan
    from omni_train.models.thinker.omni import OmniThinker

    g = torch.Generator().manual_seed(0)
    lengths = [250, 130, 401]
    features = torch.zeros(3, 8, max(lengths))
    mask = torch.zeros(3, max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        features[i, :, :n] = torch.randn(8, n, generator=g)
        mask[i, :n] = 1
    tower = SimpleNamespace(n_window=50, n_window_infer=400, config=Qwen3OmniMoeAudioEncoderConfig())
    want = tower_plan.audio_plan(tower, features, mask)
    got = OmniThinker._audio_plan(SimpleNamespace(audio_tower=tower), features, mask, torch.device("cpu"))
    assert want.keys() == got.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value) if torch.is_tensor(value) else got[key] == value, key
    assert got["padded_feature"].stride() == want["padded_feature"].stride()


def test_context_parallel_split_keeps_boundaries_whole(synth):
    """cp=2: per-token entries are cut to the rank's zigzag chunks; document_ids (the CP mask's input),
    cu_seqlens and max_seqlen (full rows, unused under CP) and the media pass whole; a tensor the split
    does not know is refused rather than passed on uncut."""
    from omni_train.parallel.context_parallel import slice_for_cp_rank, split_for_context_parallel

    batch = _source(_cfg(synth)).next_microbatches()[0]
    local = split_for_context_parallel(batch, cp_rank=1, cp_size=2)
    for key in ("input_ids", "labels", "loss_mask", "modality_ids"):
        assert torch.equal(local[key], slice_for_cp_rank(batch[key], 1, 1, 2)), key
    for key in ("position_ids", "document_ids", "cu_seqlens", "max_seqlen", "media", "media_sizes", "keys"):
        assert local[key] is batch[key], key
    with pytest.raises(ValueError, match="attention_mask"):
        split_for_context_parallel(dict(batch, attention_mask=torch.zeros(2, 1, 256, 256)), 0, 2)
