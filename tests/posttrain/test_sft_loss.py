"""SFT's loss on a packed batch of conversations equals the loss computed from transformers' logits of the
exported model on the same conversations, one at a time (its own positions, its own attention), with
the same targets: packing, per-document TM-RoPE positions, the packed attention path, the towers and the
loss normalisation all checked at once (fp32, 1e-5)."""

import json

import torch
from megatron.core import dist_checkpointing
from omegaconf import OmegaConf

from omni_train.checkpoint.manager import MARKER
from omni_train.config import compose
from omni_train.config.schema import ParallelConfig, ThinkerConfig
from omni_train.data.batch import shard_batch
from omni_train.data.decode import decode_sample
from omni_train.data.media_batch import collate_media
from omni_train.data.mixture import build_loader
from omni_train.data.packing import Document, SequencePacker, collate_packed
from omni_train.data.shards import chat_encoder
from omni_train.export.convert import export_hf
from omni_train.export.generate import load_export
from omni_train.models.thinker.hf_config import hf_thinker_config
from omni_train.models.thinker.omni import build_omni_thinker
from omni_train.stages.multimodal_pretrain import forward
from tests.conftest import redraw_weights


def _conversations(cfg, encoder, count):
    """The first `count` SFT conversations without video (transformers' thinker takes a video's audio
    through other arguments), encoded as the stage encodes them."""
    loader = build_loader([(d.path, d.weight) for d in cfg.data.datasets], weight_by="samples", rank=0,
                          world_size=1, num_workers=0, shuffle_buffer=1, seed=0, transform=lambda raw: raw)
    docs = []
    while len(docs) < count:
        sample = decode_sample(next(loader))
        encoded = encoder.encode(sample)
        if all(m.kind != "video" for m in encoded.media):
            docs.append(encoded)
    return docs


def test_packed_sft_loss_equals_transformers_per_conversation(megatron_world1, posttrain_root, tmp_path):
    cfg = compose(["recipe=tiny/sft", "init_from=null", f"run_dir={tmp_path / 'run'}",
                   f"data.datasets=[{{path: {posttrain_root / 'sft'}, weight: 1.0}}]",
                   f"data.tokenizer={posttrain_root / 'tokenizer'}"])
    encoder = chat_encoder(cfg.data)
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ThinkerConfig), cfg.model.thinker))
    ours = build_omni_thinker(hf_thinker_config(model_cfg, encoder.ids), model_cfg, ParallelConfig(), device="cpu",
                              params_dtype=torch.float32)
    redraw_weights(ours, 0.1)  # large weights: outputs depend on positions, documents and media
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    dist_checkpointing.save({"model": ours.sharded_state_dict()}, str(step))
    (step / MARKER).write_text(json.dumps({"step": 1, "consumed_samples": 0}))
    OmegaConf.save(cfg, tmp_path / "run" / "config.yaml")
    reference, _ = load_export(export_hf(tmp_path / "run" / "checkpoints", tmp_path / "hf"))

    docs = _conversations(cfg, encoder, 5)
    assert {m.kind for d in docs for m in d.media} == {"audio", "image"}
    assert sum(len(d.assistant_spans) > 1 for d in docs) >= 1  # a multi-turn conversation is among them
    packer = SequencePacker(sum(d.num_tokens for d in docs) + 3, pad_id=encoder.tokenizer.pad_token_id)
    for doc in docs:
        assert packer.add(Document.from_encoded(doc)) == []
    (row,) = packer.flush()
    batch = shard_batch(collate_packed([row]))
    assert len(batch["keys"]) == len(docs) and batch["cu_seqlens"].numel() == len(docs) + 2  # + padding
    with torch.no_grad():
        per_token, loss_func = forward(ours.eval(), batch)
        loss_sum, count, _ = loss_func(per_token)

    total, targets = 0.0, 0
    with torch.no_grad():
        for doc in docs:
            towers = {k: v for k, v in collate_media(doc.media).items() if v is not None}
            logits = reference.thinker(input_ids=doc.input_ids[None], attention_mask=torch.ones_like(doc.input_ids)[None],
                                       **towers).logits[0].double()
            nll = -torch.log_softmax(logits[:-1], -1).gather(1, doc.input_ids[1:, None])[:, 0]
            keep = doc.loss_mask[1:]
            total += nll[keep].sum().item()
            targets += int(keep.sum())
    assert int(count) == targets
    assert abs(loss_sum.item() / int(count) - total / targets) <= 1e-5, (loss_sum.item() / int(count), total / targets)
    assert total / targets > 1.0  # far from a trivial loss
