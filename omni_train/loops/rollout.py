"""The rollout loop (``stage.loop=rollout``): each optimizer step samples its own batch from the policy.

    sync weights -> prompts (data.prompts) -> generate (rollout engine) -> pack (prompt + response) ->
    forward / backward / update through the supervised loop's step (the stage's loss: on-policy
    distillation, GSPO)

Per step, each data-parallel rank takes ``stage.rollout.prompts_per_step / dp`` prompts and draws
``sampling.n`` responses for each, seeded by (trainer.seed, step, dp rank): a resumed run samples exactly
what an uninterrupted run does (the prompt cursor is in the checkpoint with the rest of the data state).
Tensor-parallel ranks of one data-parallel rank share one rollout: their first rank generates, the others
receive its samples.

Samples are packed whole into micro-batches of the trainer's shape (``trainer.micro_batch_size`` rows of
``trainer.seq_length``; per-document attention and TM-RoPE positions, as SFT packs conversations), so the
number of micro-batches follows the step's response lengths; the response tokens are the targets, and the rollout's
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

from omni_train.data.batch import shard_batch
from omni_train.data.packing import Document, SequencePacker, collate_packed, document_modality
from omni_train.loops.supervised import SupervisedLoop
from omni_train.losses.onpolicy import token_logprobs
from omni_train.parallel.process_state import preserved_rng
from omni_train.rollout import Sample, build_engine, model_logits, sampling_seed
from omni_train.session import Session

def _document(sample: Sample, uid: int) -> Document:
    prompt, response = sample.prompt, np.asarray(sample.token_ids, dtype=np.int64)
    ids = np.concatenate([prompt.input_ids.numpy(), response])
    mask = np.concatenate([np.zeros(prompt.num_tokens, bool), np.ones(len(response), bool)])
    # generated text continues every TM-RoPE axis from the prompt's largest position (as transformers'
    # generate does through its rope deltas)
    pos = prompt.position_ids.numpy()
    after = pos.max() + 1 + np.arange(len(response), dtype=pos.dtype)
    pos = np.concatenate([pos, np.broadcast_to(after, (3, len(response)))], axis=1)
    return Document(ids, mask, pos, [tuple(m.span) for m in prompt.media], list(prompt.media), str(uid),
                    document_modality(m.kind for m in prompt.media))


def rollout_microbatches(samples: Sequence[Sample], pad_id: int, seq_length: int, micro_batch_size: int,
                         max_open: int = 8) -> Tuple[List[Dict], List[Tuple[int, int, int, int]]]:
    """Samples -> micro-batches of ``micro_batch_size`` rows of ``seq_length`` tokens (the trainer's one
    shape: compiled kernels see no new shapes), each sample whole in one row (first-fit packing,
    per-document attention and positions), and where each sample's targets lie: (micro-batch, row, start,
    end) per sample. Position t's label is token t + 1, so a response of r tokens after a prompt of p at
    offset o is targets [o + p - 1, o + p - 1 + r). Each micro-batch also carries ``rollout_logprobs``
    [B, L] float32 and ``sample_ids`` [B, L] int64 (the sample's index in ``samples``; -1 elsewhere) at
    the target positions. The last micro-batch may hold fewer rows."""
    packer = SequencePacker(seq_length, pad_id=pad_id, max_open=max_open)
    rows = []
    for uid, sample in enumerate(samples):
        doc = _document(sample, uid)
        if len(doc.input_ids) > seq_length:
            raise ValueError(f"sample of {sample.prompt.key}: prompt + response = {len(doc.input_ids)} tokens > "
                             f"trainer.seq_length={seq_length} (stage.rollout.max_prompt_tokens + "
                             f"sampling.max_new_tokens must fit)")
        rows += packer.add(doc)
    rows += packer.flush()
    micro, where = [], [None] * len(samples)
    for m in range(0, len(rows), micro_batch_size):
        group = rows[m:m + micro_batch_size]
        batch = shard_batch(collate_packed(group))
        logprobs = torch.zeros(len(group), seq_length, dtype=torch.float32)
        sample_ids = torch.full((len(group), seq_length), -1, dtype=torch.long)
        for b, row in enumerate(group):
            for d, key in enumerate(row.keys):
                if key is None:
                    continue
                i = int(key)
                sample = samples[i]
                start = int(row.cu_seqlens[d]) + sample.prompt.num_tokens - 1
                end = start + len(sample.token_ids)
                logprobs[b, start:end] = torch.tensor(sample.logprobs, dtype=torch.float32)
                sample_ids[b, start:end] = i
                where[i] = (len(micro), b, start, end)
        batch["rollout_logprobs"], batch["sample_ids"] = logprobs, sample_ids
        micro.append(batch)
    return micro, where


def recompute_logprobs(model, batch, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / T) of each position's label [B, L] under ``model`` (the trainer's view of
    the rollout's log-probabilities; meaningful at the target positions)."""
    return token_logprobs(model_logits(model, batch), batch["labels"],
                          temperature=temperature if temperature > 0 else 1.0)


class RolloutLoop(SupervisedLoop):
    def __init__(self, session: Session):
        super().__init__(session)
        cfg, env = self.cfg, self.env
        rollout = cfg.stage.rollout
        self.dp_rank = parallel_state.get_data_parallel_rank()
        dp = parallel_state.get_data_parallel_world_size()
        if rollout.prompts_per_step % dp:
            raise ValueError(f"stage.rollout.prompts_per_step={rollout.prompts_per_step} does not divide over "
                             f"{dp} data-parallel ranks")
        self.prompts_per_rank = rollout.prompts_per_step // dp
        with preserved_rng():  # the trained model's run is the same with or without an engine beside it
            self.engine = build_engine(rollout.backend, cfg.model.thinker, session.data.encoder, env.device,
                                       session.dtype, rollout.generation_batch)
        self.pad_id = session.data.encoder.tokenizer.pad_token_id
        self.rollout_values: Dict[str, float] = {}
        self._step_start = time.perf_counter()
        self._targets = 0  # this rank's target tokens of the current step

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
        generation_start = time.perf_counter()
        samples = None
        if parallel_state.get_tensor_model_parallel_rank() == 0:
            samples = self.engine.generate(prompts, rollout.sampling,
                                           seed=sampling_seed(self.cfg.trainer.seed, step, self.dp_rank))
        samples = self._share(samples)
        done = time.perf_counter()
        trainer = self.cfg.trainer
        micro, _ = rollout_microbatches(samples, self.pad_id, trainer.seq_length, trainer.micro_batch_size)
        lengths = [len(s.token_ids) for s in samples]
        self._targets = sum(lengths)  # every response token is a target, and nothing else
        self.rollout_values = {
            "rollout_sync_ms": sync.ms,
            "rollout_generate_s": done - generation_start,
            "rollout_tokens_per_s": sum(lengths) / max(done - generation_start, 1e-9),
            "response_length": float(np.mean(lengths)),
            "response_truncated": float(np.mean([s.finish_reason == "length" for s in samples])),
        }
        self._step_start = start
        return micro

    def samples_per_step(self) -> int:
        return self.cfg.stage.rollout.prompts_per_step

    def tokens_per_step(self, micro) -> int:
        return self._targets * parallel_state.get_data_parallel_world_size()

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
