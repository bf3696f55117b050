"""The rollout loop (``stage.loop=rollout``): each optimizer step samples its own batch from the policy.

    sync weights -> prompts (data.prompts) -> generate (rollout engine) -> pack (prompt + response) ->
    forward / backward / update through the supervised loop's step (the stage's loss: on-policy
    distillation, GSPO)

Per step, each data-parallel rank takes ``stage.rollout.prompts_per_step / dp`` prompts and draws
``sampling.n`` responses for each, seeded by (trainer.seed, step, dp rank): a resumed run samples exactly
what an uninterrupted run does (the prompt cursor is in the checkpoint with the rest of the data state).
Tensor-parallel ranks of one data-parallel rank share one rollout: their first rank generates, the others
receive its samples.

Each micro-batch packs ``micro_batch_sequences`` samples into one row (per-document attention and
TM-RoPE positions, as SFT packs conversations); the response tokens are the targets, and the rollout's
log-probability of each rides along (``rollout_logprobs``), with the sample each target belongs to
(``sample_ids``), so that the stage compares the trainer's recomputed log-probabilities with the
rollout's and can form per-sequence quantities. Logged besides the stage's report: rollout tokens/s,
response length, the share of responses cut at ``max_new_tokens``, the weight sync (ms) and the step's
time split (sync / generate / the stage's timed regions such as the teacher / update).
"""

from __future__ import annotations

import time
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.utils import unwrap_model

from omni_train.data.batch import shard_batch
from omni_train.data.packing import Document, SequencePacker, collate_packed, document_modality
from omni_train.loops.supervised import SupervisedLoop
from omni_train.losses.distill import student_log_probs
from omni_train.models.common.attention import document_attention
from omni_train.rollout import Sample, build_engine, check_sampling, sampling_seed
from omni_train.session import Session

# a packed row's length is rounded up to this multiple (fewer distinct shapes for the kernels)
ROW_MULTIPLE = 8


def _document(sample: Sample) -> Document:
    prompt, response = sample.prompt, np.asarray(sample.token_ids, dtype=np.int64)
    ids = np.concatenate([prompt.input_ids.numpy(), response])
    mask = np.concatenate([np.zeros(prompt.num_tokens, bool), np.ones(len(response), bool)])
    # generated text continues every TM-RoPE axis from the prompt's largest position (as transformers'
    # generate does through its rope deltas)
    pos = prompt.position_ids.numpy()
    after = pos.max() + 1 + np.arange(len(response), dtype=pos.dtype)
    pos = np.concatenate([pos, np.broadcast_to(after, (3, len(response)))], axis=1)
    return Document(ids, mask, pos, [tuple(m.span) for m in prompt.media], list(prompt.media),
                    f"{prompt.key}#{sample.index}", document_modality(m.kind for m in prompt.media))


def rollout_documents(samples: Sequence[Sample], pad_id: int) -> Tuple[Dict, List[Tuple[int, int]]]:
    """Samples -> one packed micro-batch (ShardBatch, plus ``rollout_logprobs`` [1, L] float32 and
    ``sample_ids`` [1, L] int64 at the target positions, -1 elsewhere) and each sample's [start, end) of
    target positions: position t's label is token t + 1, so a response of r tokens after a prompt of p
    starting at offset o is targets [o + p - 1, o + p - 1 + r)."""
    docs = [_document(s) for s in samples]
    total = sum(len(d.input_ids) for d in docs)
    packer = SequencePacker(-(-total // ROW_MULTIPLE) * ROW_MULTIPLE, pad_id=pad_id, max_open=1)
    rows = [row for doc in docs for row in packer.add(doc)] + packer.flush()
    if len(rows) != 1 or len(rows[0].keys) != len(docs):
        raise AssertionError(f"{len(docs)} rollout samples packed into {len(rows)} rows, expected one")
    row = rows[0]
    batch = shard_batch(collate_packed([row]))
    length = row.input_ids.shape[0]
    logprobs = torch.zeros(1, length, dtype=torch.float32)
    sample_ids = torch.full((1, length), -1, dtype=torch.long)
    spans, offset = [], 0
    for i, (sample, doc) in enumerate(zip(samples, docs)):
        start = offset + sample.prompt.num_tokens - 1
        end = start + len(sample.token_ids)
        logprobs[0, start:end] = torch.tensor(sample.logprobs, dtype=torch.float32)
        sample_ids[0, start:end] = i
        spans.append((start, end))
        offset += len(doc.input_ids)
    batch["rollout_logprobs"], batch["sample_ids"] = logprobs, sample_ids
    return batch, spans


def model_logits(model, batch) -> torch.Tensor:
    """Our model's logits [B, L, V / tp] on a packed rollout micro-batch."""
    media = unwrap_model(model).prepare_media(batch["media"], batch["media_sizes"], batch["input_ids"].device)
    return model(batch["input_ids"], batch["position_ids"], labels=None, **document_attention(batch), **media)


def recompute_logprobs(model, batch, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / T) of each position's label [B, L] under ``model`` (the trainer's view of
    the rollout's log-probabilities; meaningful at the target positions)."""
    logits = model_logits(model, batch)
    scale = temperature if temperature > 0 else 1.0
    return student_log_probs(logits / scale, batch["labels"][..., None])[..., 0]


class RolloutLoop(SupervisedLoop):
    def __init__(self, session: Session):
        super().__init__(session)
        cfg, env = self.cfg, self.env
        rollout = cfg.stage.rollout
        check_sampling(rollout.sampling)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        dp = parallel_state.get_data_parallel_world_size()
        if rollout.prompts_per_step % dp:
            raise ValueError(f"stage.rollout.prompts_per_step={rollout.prompts_per_step} does not divide over "
                             f"{dp} data-parallel ranks")
        self.prompts_per_rank = rollout.prompts_per_step // dp
        self.engine = build_engine(rollout.backend, cfg.model.thinker, session.data.encoder, env.device,
                                   session.dtype, rollout.generation_batch)
        self.pad_id = session.data.encoder.tokenizer.pad_token_id
        self.rollout_values: Dict[str, float] = {}
        self._step_start = time.perf_counter()

    def _share(self, samples):
        """The tensor-parallel group's first rank's samples, on every rank of the group."""
        if parallel_state.get_tensor_model_parallel_world_size() == 1:
            return samples
        box = [samples]
        dist.broadcast_object_list(box, src=parallel_state.get_tensor_model_parallel_src_rank(),
                                   group=parallel_state.get_tensor_model_parallel_group())
        return box[0]

    def next_microbatches(self):
        rollout, step = self.cfg.stage.rollout, self.state.step
        start = time.perf_counter()
        sync = self.engine.sync(self.model)
        prompts = self.session.data.next_prompts(self.prompts_per_rank)
        generated = time.perf_counter()
        samples = None
        if parallel_state.get_tensor_model_parallel_rank() == 0:
            samples = self.engine.generate(prompts, rollout.sampling,
                                           seed=sampling_seed(self.cfg.trainer.seed, step, self.dp_rank))
        samples = self._share(samples)
        done = time.perf_counter()
        size = rollout.micro_batch_sequences
        micro = [rollout_documents(samples[i:i + size], self.pad_id)[0] for i in range(0, len(samples), size)]
        lengths = [len(s.token_ids) for s in samples]
        self.rollout_values = {
            "rollout_sync_ms": sync.ms,
            "rollout_generate_s": done - generated,
            "rollout_tokens_per_s": sum(lengths) / max(done - generated, 1e-9),
            "response_length": float(np.mean(lengths)),
            "response_truncated": float(np.mean([s.finish_reason == "length" for s in samples])),
        }
        self._step_start = start
        return micro

    def samples_per_step(self) -> int:
        return self.cfg.stage.rollout.prompts_per_step

    def tokens_per_step(self, micro) -> int:
        local = sum(int((batch["loss_mask"] > 0).sum()) for batch in micro) if micro else 0
        return local * parallel_state.get_data_parallel_world_size()

    def train_step(self) -> Dict[str, float]:
        timers = self.session.stage.timers
        for timer in timers.values():
            timer.reset()
        values = super().train_step()
        total = time.perf_counter() - self._step_start
        generate = self.rollout_values["rollout_generate_s"]
        sync = self.rollout_values["rollout_sync_ms"] / 1e3
        # the step's time split: sync, generate, the stage's timed regions (the teacher), the rest of the
        # update (student forward, backward, optimizer step)
        regions = {f"{name}_time_s": timer.seconds() for name, timer in timers.items()}
        update = total - generate - sync - sum(regions.values())
        return {**values, **self.rollout_values, **regions, "step_time_s": total, "update_time_s": max(update, 0.0)}


def run(session: Session) -> None:
    RolloutLoop(session).fit()
