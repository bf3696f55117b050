"""omni-convert verify for the audio output: our imported Talker and Code2Wav against transformers' modules.

Inputs (seeded, the same on every rank): a Talker sequence of CONTEXT positions, each the sum of a projected
Thinker vector (hidden_projection of a random "accept-layer hidden state" at every third position,
text_projection of a random "input embedding" elsewhere) and a random codec-id embedding, then FRAMES teacher-
forced frames (codec embedding of code 0 + the code predictor's embeddings of codes 1 .. G-1 + a projected
text row), on M-RoPE positions whose three rows differ. Each side builds the sequence from its own modules.

    talker_codec0    codec_head logits at every position (transformers: ``talker.model`` + ``codec_head``)
    talker_residual  code predictor logits of codebooks 1 .. G-1 for each frame, from the final hidden state
                     that predicted its code 0 (transformers: ``code_predictor.model`` on [h, emb(c0),
                     emb_0(c1) .. emb_{G-3}(c_{G-2})], head j on position j + 1)
    code2wav         the waveform of WAV_FRAMES random frames (``Qwen3OmniMoeCode2Wav.forward``)

Besides the outputs, every Talker and Code2Wav tensor our import holds, written back through the table, must
equal (bitwise, fp32) what transformers loaded, as ``save_pretrained`` would write it: a difference names the
tensor. At ep > 1 each rank checks the experts it holds.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.distributed as dist

from omni_train.config.schema import ParallelConfig
from omni_train.export.hf_io import HFReader
from omni_train.export.talker import AudioOutput, _expert_offset, _per_expert, fill_talker, global_talker_name
from omni_train.models.talker.code2wav import build_code2wav
from omni_train.models.talker.config import TalkerConfig
from omni_train.models.talker.model import build_talker
from omni_train.models.talker.weights import code2wav_to_hf, expand_table, hf_to_code2wav
from omni_train.models.thinker.bridge import to_hf

KINDS = ("talker_codec0", "talker_residual", "code2wav")
SEED = 4321
CONTEXT, FRAMES, WAV_FRAMES = 12, 4, 6


@dataclass
class Probe:
    """The seeded inputs (see the module docstring)."""

    embeds: torch.Tensor  # [CONTEXT, Ht] text_projection inputs
    hidden: torch.Tensor  # [CONTEXT, Ht] hidden_projection inputs
    media: torch.Tensor  # [CONTEXT] bool: positions that take hidden_projection
    context_codes: torch.Tensor  # [CONTEXT] codec ids
    text_rows: torch.Tensor  # [FRAMES, Ht] text entries of the frames
    codes: torch.Tensor  # [FRAMES, G]
    positions: torch.Tensor  # [3, 1, CONTEXT + FRAMES]
    wav_codes: torch.Tensor  # [1, G, WAV_FRAMES]

    @property
    def states(self) -> torch.Tensor:
        """Positions whose final hidden state predicts each frame's code 0."""
        return torch.arange(FRAMES) + CONTEXT - 1


def build_probe(cfg: TalkerConfig, code2wav_config: dict) -> Probe:
    gen = torch.Generator().manual_seed(SEED)
    ht, groups = cfg.thinker_hidden_size, cfg.num_code_groups
    codebook = min(cfg.code_predictor.codebook_size, code2wav_config.get("codebook_size", 2048))
    codes = torch.randint(0, codebook, (FRAMES, groups), generator=gen)
    steps = torch.arange(CONTEXT + FRAMES)
    return Probe(
        embeds=torch.randn(CONTEXT, ht, generator=gen), hidden=torch.randn(CONTEXT, ht, generator=gen),
        media=torch.arange(CONTEXT) % 3 == 1,
        context_codes=torch.randint(0, cfg.codec_vocab_size, (CONTEXT,), generator=gen),
        text_rows=torch.randn(FRAMES, ht, generator=gen), codes=codes,
        positions=torch.stack([steps, steps // 2 + 1, steps % 5 * 2])[:, None],
        wav_codes=torch.randint(0, codebook, (1, code2wav_config.get("num_quantizers", groups), WAV_FRAMES),
                                generator=gen))


def _sequence(probe: Probe, text_projection, hidden_projection, codec_embed, residual_embed) -> torch.Tensor:
    """[1, CONTEXT + FRAMES, H] from one side's modules (``residual_embed(j, ids)``: codebook j + 1's table)."""
    context = torch.where(probe.media[:, None], hidden_projection(probe.hidden), text_projection(probe.embeds))
    context = context + codec_embed(probe.context_codes)
    codes = probe.codes
    frames = codec_embed(codes[:, 0]) + text_projection(probe.text_rows)
    for j in range(1, codes.shape[1]):
        frames = frames + residual_embed(j - 1, codes[:, j])
    return torch.cat([context, frames])[None]


@torch.no_grad()
def reference_outputs(model, probe: Probe) -> Dict[str, torch.Tensor]:
    """transformers' Qwen3OmniMoeForConditionalGeneration (fp32, eval) on the probe."""
    talker, predictor = model.talker, model.talker.code_predictor
    embed, residual = talker.get_input_embeddings(), predictor.get_input_embeddings()
    inputs = _sequence(probe, talker.text_projection, talker.hidden_projection, embed, lambda j, c: residual[j](c))
    hidden = talker.model(inputs_embeds=inputs, position_ids=probe.positions).last_hidden_state
    codes, groups = probe.codes, probe.codes.shape[1]
    frame = [hidden[0, probe.states], embed(codes[:, 0])] + [residual[j - 1](codes[:, j]) for j in range(1, groups - 1)]
    states = predictor.model(inputs_embeds=torch.stack(frame, dim=1)).last_hidden_state
    return {"talker_codec0": talker.codec_head(hidden),
            "talker_residual": torch.stack([predictor.lm_head[j](states[:, j + 1]) for j in range(groups - 1)], dim=1),
            "code2wav": model.code2wav(probe.wav_codes)}


@torch.no_grad()
def talker_outputs(talker, probe: Probe) -> Dict[str, torch.Tensor]:
    """Our Talker on the probe: codebook-0 logits [1, L, V] and residual logits [FRAMES, G-1, codebook]."""
    inputs = _sequence(probe, talker.text_projection, talker.hidden_projection, talker.codec_embed,
                       lambda j, c: talker.code_predictor.codec_embedding[j](c))
    hidden = talker.backbone_hidden(inputs, probe.positions)
    return {"talker_codec0": talker.codec_logits(hidden),
            "talker_residual": talker.residual_logits(hidden[0, probe.states], probe.codes)}


# ----- tensors -----------------------------------------------------------------------------------------


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.blake2b(tensor.detach().float().contiguous().numpy().tobytes(), digest_size=16).hexdigest()


def reference_digests(model) -> Dict[str, str]:
    """{HF on-disk name: digest} of transformers' loaded talker.* and code2wav.* tensors, named as
    ``save_pretrained`` writes them (its own reversal of the in-memory expert fusion)."""
    from transformers.core_model_loading import revert_weight_conversion

    state = {k: v for k, v in model.state_dict().items() if k.startswith(("talker.", "code2wav."))}
    return {name: _digest(t) for name, t in revert_weight_conversion(model, state).items()}


def our_digests(talker, cfg: TalkerConfig, code2wav=None) -> Dict[str, str]:
    """{HF name: digest} of what this rank's Talker (and Code2Wav) hold, through the table."""
    table = {ours: (row, hf) for row, ours, hf in expand_table(cfg)}
    offset, out = _expert_offset(cfg), {}
    for name, param in talker.named_parameters():
        row, hf_names = table[global_talker_name(name, offset)]
        out.update({n: _digest(t) for n, t in zip(hf_names, to_hf(row, param, cfg))})
    if code2wav is not None:
        out.update({n: _digest(t) for n, t in code2wav_to_hf(code2wav.state_dict()).items()})
    return out


def tensor_mismatches(reference: Dict[str, str], ours: Dict[str, str]) -> Tuple[Set[str], Set[str]]:
    """(names whose tensors differ, names checked)."""
    return {n for n, d in ours.items() if reference.get(n) != d}, set(ours)


# ----- the check ---------------------------------------------------------------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _gather(obj) -> List:
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _broadcast(obj):
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def check_audio_output(audio: AudioOutput, reader: HFReader, code2wav_config: dict, layout: ParallelConfig,
                       reference: Optional[Dict[str, str]], probe: Probe
                       ) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    """Our outputs on the probe (rank 0: the Code2Wav waveform too) and, on rank 0, a message naming the
    tensors that differ from transformers' (``reference``: rank 0's ``reference_digests``; None elsewhere).
    Every rank builds its Talker in fp32 (random init, then import's ``fill_talker``) and runs the probe."""
    cfg = audio.cfg
    talker = build_talker(_per_expert(cfg), layout, device="cpu", params_dtype=torch.float32).eval()
    fill_talker(talker, reader, cfg)
    outputs = talker_outputs(talker, probe)
    code2wav = None
    if _rank() == 0:
        code2wav = build_code2wav(code2wav_config, dtype=torch.float32)
        code2wav.load_state_dict(hf_to_code2wav({n: reader.get(n) for n in audio.code2wav_names}), strict=True)
        outputs["code2wav"] = code2wav(probe.wav_codes)
    reference = _broadcast(reference)
    results = _gather(tensor_mismatches(reference, our_digests(talker, cfg, code2wav)))
    if _rank() != 0:
        return outputs, None
    differ = sorted(set().union(*(d for d, _ in results)))
    unchecked = sorted(set(reference) - set().union(*(c for _, c in results)))
    parts = []
    if differ:
        more = f" and {len(differ) - 1} more" if len(differ) > 1 else ""
        parts.append(f"talker tensors differ from transformers': {differ[0]!r}{more}")
    if unchecked:
        parts.append(f"transformers holds {unchecked[0]!r} ({len(unchecked)} such), which our import does not")
    return outputs, "; ".join(parts) or None


def reference_kinds(model, probe: Optional[Probe]) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, str]]]:
    """(outputs by kind, digests) of transformers' model; empty without a probe."""
    if probe is None:
        return {}, None
    return reference_outputs(model, probe), reference_digests(model)

