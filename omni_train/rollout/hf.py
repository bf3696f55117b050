"""Rollout backend ``hf``: transformers' Qwen3-Omni Thinker in the training process.

Built once per rank at the trained model's sizes (``export.from_run.hf_omni_config``: the same config an
export of this run writes), without random initialisation; ``sync`` copies the trained weights into it
(rollout/sync.py). ``generate`` runs transformers' own ``generate`` (KV cache, left-padded batches, audio /
image / video prompts through the towers) and records, for each generated token, its log-probability
under ``log_softmax(logits / T)``: a logits processor placed before transformers' temperature / top-k /
top-p processors sees each step's raw logits and keeps them with their log-sum-exp until the next step
shows which token was taken. The media placeholder ids are never sampled (``_Suppress``).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.initialization import no_init_weights
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerForConditionalGeneration

from omni_train.config.rollout import SamplingConfig
from omni_train.data.media_batch import collate_media
from omni_train.data.prompts import Prompt
from omni_train.export.from_run import hf_omni_config
from omni_train.rollout import Sample, check_sampling, stop_ids
from omni_train.rollout.sync import SyncReport, ThinkerWeightSync


class _TakenLogProbs(LogitsProcessor):
    """Log-probability of each generated token under log_softmax(raw logits / T): per step it keeps the raw
    logits (the tensor transformers hands over, no copy) and their log-sum-exp ([B]); the next step, whose
    input ids end with the token taken, reads that token's logit from them. No [B, V] tensor is written."""

    def __init__(self, temperature: float):
        self.temperature = temperature if temperature > 0 else 1.0
        self.pending = None  # (raw logits [B, V], logsumexp(logits / T) [B]) of the last step
        self.taken: List[torch.Tensor] = []

    def _take(self, token_ids: torch.Tensor) -> None:
        logits, lse = self.pending
        self.taken.append(logits.gather(1, token_ids).squeeze(1).float() / self.temperature - lse)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.pending is not None:  # input_ids now end with the token that step chose
            self._take(input_ids[:, -1:])
        self.pending = (scores, torch.logsumexp(scores.float() / self.temperature, dim=-1))
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[B, new tokens]: the last step's token read from the final sequences."""
        if self.pending is not None:
            self._take(sequences[:, -1:])
            self.pending = None
        return torch.stack(self.taken, dim=1)


class _Suppress(LogitsProcessor):
    """Never sample the media placeholder ids: a response holding one would ask the towers for features
    of media that does not exist. Runs after ``_TakenLogProbs``, so the recorded log-probabilities stay
    those of the model's full distribution (what the trainer recomputes); on a trained model the mass
    on these ids is negligible, on a random one it is what keeps rollouts usable."""

    def __init__(self, ids, vocab_size: int):
        self.ids = sorted({i for i in ids if 0 <= i < vocab_size})
        self._index = None  # the ids on the scores' device, made once

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._index is None or self._index.device != scores.device:
            self._index = torch.tensor(self.ids, dtype=torch.long, device=scores.device)
        # in place: the raw logits _TakenLogProbs keeps change only at ids that are never taken
        return scores.index_fill_(1, self._index, float("-inf"))


def _hf_media(prompts: Sequence[Prompt], device, dtype) -> dict:
    """The rows' media in row order as transformers' Thinker takes them."""
    items = [item for prompt in prompts for item in prompt.media]
    if not items:
        return {}
    towers = {k: v for k, v in collate_media(items).items() if v is not None}
    out = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in towers.items()}
    videos = [item for item in items if item.kind == "video"]
    if videos:
        out["video_second_per_grid"] = torch.tensor([float(v.features["second_per_grid"]) for v in videos],
                                                    device=device)
        out["use_audio_in_video"] = any("audio" in v.features for v in videos)
    return out


class HFRolloutEngine:
    def __init__(self, model_cfg, encoder, device, dtype, generation_batch: int = 0):
        self.encoder, self.device, self.dtype = encoder, torch.device(device), dtype
        self.generation_batch = generation_batch
        config = hf_omni_config(model_cfg, encoder).thinker_config
        config._attn_implementation = "sdpa"
        with torch.device(self.device), no_init_weights():
            self.model = Qwen3OmniMoeThinkerForConditionalGeneration._from_config(config, dtype=dtype)
        self.model.eval().requires_grad_(False)
        self._sync = ThinkerWeightSync(self.model, model_cfg)
        self.pad_id = encoder.ids["pad"]
        self.suppress = _Suppress([encoder.ids[k] for k in ("audio_pad", "image_pad", "video_pad")],
                                  config.text_config.vocab_size)

    def sync(self, model: torch.nn.Module) -> SyncReport:
        return self._sync(model)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig, seed: int) -> List[Sample]:
        """``sampling.n`` samples of each prompt (prompt-major), in batches of ``generation_batch`` rows."""
        check_sampling(sampling)
        rows = [(prompt, i) for prompt in prompts for i in range(sampling.n)]
        size = self.generation_batch or len(rows) or 1
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        out: List[Sample] = []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for start in range(0, len(rows), size):
                out.extend(self._generate_batch(rows[start:start + size], sampling))
        return out

    def inputs(self, prompts: Sequence[Prompt]) -> dict:
        """transformers' ``generate`` inputs of one batch of rows: left-padded ids (every row's next token at
        the same column), the attention mask and the rows' media on the engine's device."""
        longest = max(p.num_tokens for p in prompts)
        input_ids = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for b, prompt in enumerate(prompts):
            input_ids[b, longest - prompt.num_tokens:] = prompt.input_ids
            attention_mask[b, longest - prompt.num_tokens:] = 1
        return dict(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                    **_hf_media(prompts, self.device, self.dtype))

    def _generate_batch(self, rows, sampling: SamplingConfig) -> List[Sample]:
        prompts = [prompt for prompt, _ in rows]
        inputs = self.inputs(prompts)
        longest = inputs["input_ids"].shape[1]
        stops = stop_ids(self.encoder, sampling)
        recorder = _TakenLogProbs(sampling.temperature)
        sample = sampling.temperature > 0
        options = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                       top_k=sampling.top_k or None) if sample else dict(do_sample=False)
        sequences = self.model.generate(
            **inputs, max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=0, eos_token_id=stops, pad_token_id=self.pad_id,
            logits_processor=LogitsProcessorList([recorder, self.suppress]), use_cache=True, **options)
        logprobs = recorder.finish(sequences).cpu()
        new = sequences[:, longest:].cpu()
        samples = []
        for b, (prompt, index) in enumerate(rows):
            ids = new[b].tolist()
            end = next((i + 1 for i, t in enumerate(ids) if t in stops), None)
            reason = "stop" if end is not None else "length"
            end = end or len(ids)
            samples.append(Sample(prompt, index, ids[:end], logprobs[b, :end].tolist(), reason))
        return samples

