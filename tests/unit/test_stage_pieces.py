"""Pieces of the pretraining stages: phase plans and their validation, per-modality losses (packing's
modality ids and the loss report), full activation recomputation."""

import numpy as np
import pytest
import torch

from omni_train.config import ConfigError, compose, validate_config
from omni_train.config.schema import ThinkerConfig, ParallelConfig, PhaseConfig, StageConfig
from omni_train.data.packing import MODALITIES, Document, SequencePacker, document_modality
from omni_train.losses.lm import masked_token_loss
from omni_train.stages import apply_trainable, phase_at, phase_plan


def test_phase_plan_spans_and_lookup():
    cfg = StageConfig(name="s", phases=[PhaseConfig(name="a", steps=3, trainable=["x"]),
                                        PhaseConfig(name="b", steps=2, trainable=["y"], frozen=["z"])])
    plan = phase_plan(cfg, max_steps=5)
    assert [(p.name, p.start, p.end, p.trainable, p.frozen) for p in plan] == [
        ("a", 0, 3, ("x",), ()), ("b", 3, 5, ("y",), ("z",))]
    # phase_at(step) is the phase that trains step+1 after `step` completed steps
    assert [phase_at(plan, s).name for s in range(7)] == ["a", "a", "a", "b", "b", "b", "b"]
    single = phase_plan(StageConfig(name="s", trainable=["q"]), max_steps=4)
    assert [(p.name, p.start, p.end, p.trainable) for p in single] == [("s", 0, 4, ("q",))]


def test_phase_steps_must_add_up_to_max_steps():
    cfg = compose(["recipe=tiny/audio_align", "stage.phases.0.steps=3"])
    with pytest.raises(ConfigError, match=r"^stage\.phases: phase steps \[3, 10\] add up to 13, not "
                                          r"trainer\.max_steps=20"):
        validate_config(cfg, world_size=1, cuda_available=False)


def test_trainable_patterns_that_match_nothing_are_refused():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"stage\.trainable: patterns \['\^audio_tower'\]"):
        apply_trainable(model, ["^audio_tower"], [])
    counts = apply_trainable(model, [r"^0\.weight"], [])
    assert counts == {"trainable": 4, "frozen": 2} and not model[0].bias.requires_grad


def test_document_modality_is_its_richest_medium():
    assert [document_modality(k) for k in ([], ["audio"], ["audio", "image"], ["image", "video"],
                                           ["video", "audio"])] == [0, 1, 2, 3, 3]


def test_packed_modality_ids_follow_documents():
    docs = [Document(np.arange(5), np.ones(5, bool), modality=MODALITIES.index("audio"), key="a"),
            Document(np.arange(3), np.ones(3, bool), modality=MODALITIES.index("text"), key="t"),
            Document(np.arange(4), np.ones(4, bool), modality=MODALITIES.index("video"), key="v")]
    packed = list(SequencePacker(max_length=14, pad_id=0).pack(docs))
    assert len(packed) == 1
    assert packed[0].modality_ids.tolist() == [1] * 5 + [0] * 3 + [3] * 4 + [-1] * 2


def test_modality_losses_sum_to_the_total():
    torch.manual_seed(0)
    per_token = torch.rand(2, 8)
    mask = (torch.rand(2, 8) > 0.3).float()
    modality = torch.tensor([[0, 0, 1, 1, 1, 2, 2, -1], [3, 3, 3, 3, 0, 0, -1, -1]])
    loss_sum, num_tokens, report = masked_token_loss(per_token, mask, modality_ids=modality)
    assert set(report) == {"loss", *(f"loss_{m}" for m in MODALITIES)}
    table = torch.stack([report[f"loss_{m}"] for m in MODALITIES])
    for m in range(len(MODALITIES)):
        keep = (modality == m).float() * mask
        assert torch.allclose(table[m, 0], (per_token * keep).sum())
        assert table[m, 1].item() == keep.sum().item()
    padded = ((modality < 0).float() * mask).sum()  # padding carries no modality
    assert torch.allclose(table[:, 0].sum(), loss_sum - (per_token * (modality < 0) * mask).sum())
    assert table[:, 1].sum().item() == num_tokens.item() - padded.item()


def _layer_calls_and_grads(recompute: str):
    from omni_train.models.thinker.lm import build_thinker_lm

    cfg = ThinkerConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4,
                      num_query_groups=2, head_dim=16, num_experts=4, router_topk=2, moe_ffn_hidden_size=24,
                      mrope_section=[4, 2, 2])
    torch.manual_seed(0)
    model = build_thinker_lm(cfg, ParallelConfig(), device="cpu", params_dtype=torch.float32,
                             recompute=recompute)
    calls = []
    for layer in model.decoder.layers:
        layer.self_attention.register_forward_pre_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, 64, (1, 16))
    pos = torch.arange(16).expand(3, 1, 16)
    loss = model(ids, pos, attention_mask=None, labels=ids).sum()
    loss.backward()
    # no routing probabilities (and their recomputed graph) outlive the step
    assert all(getattr(m.token_dispatcher, "probs", None) is None for m in model.modules()
               if hasattr(m, "token_dispatcher"))
    return len(calls), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_full_recompute_reruns_each_layer_and_keeps_gradients(megatron_world1):
    plain_calls, plain = _layer_calls_and_grads("none")
    calls, grads = _layer_calls_and_grads("full")
    assert plain_calls == 2 and calls == 4  # each layer's forward again in backward
    assert plain.keys() == grads.keys()
    assert all(torch.allclose(plain[n], grads[n], atol=1e-6) for n in plain)
