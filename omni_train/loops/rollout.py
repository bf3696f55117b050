"""The rollout loop (``stage.loop=rollout``): each step samples its own batch from the policy.

    sync weights -> prompts (data.prompts) -> generate (rollout engine) -> the stage's plan (rewards,
    advantages, old log-probabilities, mini-batches: ``Stage.plan_rollout``) -> pack (prompt + response)
    -> forward / backward / update through the supervised loop's ``update``, once per mini-batch (the
    stage's loss: on-policy distillation, GSPO)

Per step, each data-parallel rank takes ``stage.rollout.prompts_per_step / dp`` prompts and draws
``sampling.n`` responses for each, seeded by (trainer.seed, step, dp rank): a resumed run samples exactly
what an uninterrupted run does (the prompt cursor is in the checkpoint with the rest of the data state;
a step is a whole rollout batch, so a checkpoint never falls between its updates). Tensor-parallel ranks
of one data-parallel rank share one rollout: their first rank generates, the others receive its samples.
The LR schedule advances once per step.

Samples are packed whole into micro-batches of the trainer's shape (``trainer.micro_batch_size`` rows of
``trainer.seq_length``; per-document attention and TM-RoPE positions, as SFT packs conversations), so the
number of micro-batches follows the step's response lengths (every rank of a data-parallel group runs as
many: ranks short of samples add padding micro-batches); the response tokens are the targets, and the rollout's
log-probability of each rides along (``rollout_logprobs``), with the sample each target belongs to
(``sample_ids``) and the fields the stage's plan names (advantages, old log-probabilities), so that the
stage compares the trainer's recomputed log-probabilities with the rollout's and can form per-sequence
quantities. Logged besides the stage's report: rollout tokens/s, response length, the share of responses
cut at ``max_new_tokens``, the weight sync (ms) and the step's time split (sync / generate / plan / the
stage's timed regions such as the teacher / update).
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
from omni_train.models.common.moe_load import uncounted
from omni_train.parallel.process_state import preserved_rng
from omni_train.rollout import RolloutPlan, Sample, build_engine, model_logits, sampling_seed
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
                         max_open: int = 8, fields: Sequence[str] = ()
                         ) -> Tuple[List[Dict], List[Tuple[int, int, int, int]]]:
    """Samples -> micro-batches of ``micro_batch_size`` rows of ``seq_length`` tokens (the trainer's one
    shape: compiled kernels see no new shapes), each sample whole in one row (first-fit packing,
    per-document attention and positions), and where each sample's targets lie: (micro-batch, row, start,
    end) per sample. Position t's label is token t + 1, so a response of r tokens after a prompt of p at
    offset o is targets [o + p - 1, o + p - 1 + r). Each micro-batch also carries ``rollout_logprobs``
    [B, L] float32 and ``sample_ids`` [B, L] int64 (the sample's index in ``samples``; -1 elsewhere) at
    the target positions, and one [B, L] float32 tensor per name in ``fields`` from ``sample.extra``: a
    number fills the sample's targets, a list gives one value per response token. The last micro-batch
    may hold fewer rows. No samples: one micro-batch of a single padding row with no targets (what a rank
    trains on while others of its data-parallel group still have micro-batches)."""
    packer = SequencePacker(seq_length, pad_id=pad_id, max_open=max_open)
    rows = []
    for uid, sample in enumerate(samples):
        doc = _document(sample, uid)
        if len(doc.input_ids) > seq_length:
            raise ValueError(f"sample of {sample.prompt.key}: prompt + response = {len(doc.input_ids)} tokens > "
                             f"trainer.seq_length={seq_length} (stage.rollout.max_prompt_tokens + "
                             f"sampling.max_new_tokens must fit)")
        rows += packer.add(doc)
    if not samples:
        rows += packer.add(Document(np.full(1, pad_id, np.int64), np.zeros(1, bool), np.zeros((3, 1), np.int64),
                                    key=None))
    rows += packer.flush()
    micro, where = [], [None] * len(samples)
    for m in range(0, len(rows), micro_batch_size):
        group = rows[m:m + micro_batch_size]
        batch = shard_batch(collate_packed(group))
        shape = (len(group), seq_length)
        logprobs = torch.zeros(shape, dtype=torch.float32)
        sample_ids = torch.full(shape, -1, dtype=torch.long)
        extra = {name: torch.zeros(shape, dtype=torch.float32) for name in fields}
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
                for name, tensor in extra.items():
                    value = sample.extra[name]
                    tensor[b, start:end] = (torch.tensor(value, dtype=torch.float32)
                                            if isinstance(value, (list, tuple, np.ndarray)) else float(value))
                where[i] = (len(micro), b, start, end)
        batch["rollout_logprobs"], batch["sample_ids"] = logprobs, sample_ids
        batch.update(extra)
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
        self._targets = 0  # this rank's target tokens of the current step
        self._generate_s = 0.0
        self._lengths: List[int] = []
        self._truncated = 0
        self._prompt_kinds: Dict[str, int] = {}

    def share(self, obj):
        """The tensor-parallel group's first rank's ``obj`` (samples, rewards), on every rank of the group."""
        if parallel_state.get_tensor_model_parallel_world_size() == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=parallel_state.get_tensor_model_parallel_src_rank(),
                                   group=parallel_state.get_tensor_model_parallel_group())
        return box[0]

    def sample(self, count: int, round: int = 0) -> List[Sample]:
        """``count`` more prompts of this rank and ``sampling.n`` responses to each from the current policy
        (round r > 0: a stage's extra draw within a step, seeded apart from the first)."""
        rollout = self.cfg.stage.rollout
        prompts = self.session.data.next_prompts(count)
        for prompt in prompts:
            for kind in {m.kind for m in prompt.media} or {"text"}:
                self._prompt_kinds[kind] = self._prompt_kinds.get(kind, 0) + 1
        start = time.perf_counter()
        samples = None
        if parallel_state.get_tensor_model_parallel_rank() == 0:
            seed = sampling_seed(self.cfg.trainer.seed + round * 7_777_777, self.state.step, self.dp_rank)
            samples = self.engine.generate(prompts, rollout.sampling, seed=seed)
        samples = self.share(samples)
        self._generate_s += time.perf_counter() - start
        self._lengths += [len(s.token_ids) for s in samples]
        self._truncated += sum(s.finish_reason == "length" for s in samples)
        return samples

    def trainer_logprobs(self, samples: Sequence[Sample]) -> List[List[float]]:
        """The trained model's log-probability of each response token, log_softmax(logits / T) at the
        sampling temperature, as the rollout's (one forward, no gradient, not counted in the MoE load)."""
        if not samples:
            return []
        trainer, temperature = self.cfg.trainer, self.cfg.stage.rollout.sampling.temperature
        micro, where = rollout_microbatches(samples, self.pad_id, trainer.seq_length, trainer.micro_batch_size)
        with torch.no_grad(), uncounted():
            values = [recompute_logprobs(self.model, self._prepare(batch), temperature).cpu() for batch in micro]
        return [values[m][b, start:end].tolist() for m, b, start, end in where]

    def _microbatches(self, samples: Sequence[Sample], fields: Sequence[str]):
        """This rank's prepared micro-batches of ``samples``, as many as the most any rank of the
        data-parallel group has (padding ones without targets: expert-parallel ranks exchange tokens in
        every micro-batch, so they must run as many); None when no rank has a sample."""
        trainer = self.cfg.trainer
        micro, _ = rollout_microbatches(samples, self.pad_id, trainer.seq_length, trainer.micro_batch_size,
                                        fields=fields)
        count = torch.tensor([len(micro) if samples else 0], device=self.env.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=parallel_state.get_data_parallel_group())
        most = int(count.item())
        if most == 0:
            return None
        if not samples:
            micro = []
        while len(micro) < most:
            micro += rollout_microbatches([], self.pad_id, trainer.seq_length, trainer.micro_batch_size,
                                          fields=fields)[0]
        return [self._prepare(batch) for batch in micro]

    def global_means(self, pairs: Dict[str, Tuple[float, float]]) -> Dict[str, float]:
        """{name: (sum, count)} of this rank -> {name: sum / count} over the data-parallel group (NaN where no
        rank counted any)."""
        names = sorted(pairs)
        if not names:
            return {}
        sums = torch.tensor([[float(pairs[n][0]), float(pairs[n][1])] for n in names], dtype=torch.float64,
                            device=self.env.device)
        dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        return {n: (s / c if c else float("nan")) for n, (s, c) in zip(names, sums.tolist())}

    def samples_per_step(self) -> int:
        return self.cfg.stage.rollout.prompts_per_step

    def train_step(self) -> Dict[str, float]:
        """sync -> sample -> the stage's plan (scores, mini-batches) -> one update per mini-batch."""
        self._connect_schedule()
        start = time.perf_counter()
        timers = self.session.stage.timers
        for timer in timers.values():
            timer.reset()
        self._generate_s, self._lengths, self._truncated, self._prompt_kinds = 0.0, [], 0, {}
        sync = self.engine.sync(self.model)
        samples = self.sample(self.prompts_per_rank)
        plan_start, generated = time.perf_counter(), self._generate_s
        plan_hook = self.session.stage.plan_rollout
        plan = plan_hook(self, samples) if plan_hook is not None else RolloutPlan([list(samples)])
        plan_s = max(time.perf_counter() - plan_start - (self._generate_s - generated), 0.0)  # less its draws
        # The LR of step s+1 (1-based) applies to all of this step's updates.
        self.session.scheduler.step(increment=1)
        updates, stop = [], False
        self._targets = sum(len(s.token_ids) for part in plan.minibatches for s in part)
        for part in plan.minibatches:
            micro = self._microbatches(part, [f for f in plan.fields if all(f in s.extra for s in part)])
            if micro is None:  # no rank has a sample for this update
                continue
            updates.append(self.update(micro))
            stop = stop or self.stop_requested
        self.stop_requested = stop
        values = _combine(updates, plan.first_only)
        self.state.step += 1
        self.state.consumed_samples += self.samples_per_step()
        self.session.throughput.add(self.tokens_per_step(None))
        total = time.perf_counter() - start
        lengths = self._lengths or [0]
        regions = {f"{name}_time_s": timer.seconds() for name, timer in timers.items()}
        generate = self._generate_s
        self.rollout_values = {
            "rollout_sync_ms": sync.ms,
            "rollout_generate_s": generate,
            "rollout_tokens_per_s": sum(self._lengths) / max(generate, 1e-9),
            "response_length": float(np.mean(lengths)),
            "response_truncated": self._truncated / max(len(self._lengths), 1),
            # this rank's prompts of the step by what they hold besides text (a prompt with audio and an
            # image counts for both; "text": no media)
            **{f"prompts_{kind}": float(n) for kind, n in sorted(self._prompt_kinds.items())},
        }
        # the step's time split: sync, generate, the stage's planning (rewards, old log-probabilities), its
        # timed regions (a teacher's or reference's forwards), the rest of the updates
        update = total - generate - sync.ms / 1e3 - plan_s - sum(regions.values())
        return {**values, **plan.values, **self.rollout_values, **regions, "plan_time_s": plan_s,
                "step_time_s": total, "update_time_s": max(update, 0.0), "updates": float(len(updates))}

    def tokens_per_step(self, micro) -> int:
        return self._targets * parallel_state.get_data_parallel_world_size()


def _combine(updates: List[Dict[str, float]], first_only: Sequence[str] = ()) -> Dict[str, float]:
    """One step's values from its updates: the mean of each (``*_max`` names: the largest; ``first_only``
    names: the first update's)."""
    if not updates:
        return {"loss": float("nan")}
    out = {}
    for name in updates[0]:
        column = [u[name] for u in updates if name in u]
        if name in first_only:
            out[name] = column[0]
        elif name.endswith("_max"):
            out[name] = max(column)
        else:
            out[name] = float(np.mean(column))
    return out


def run(session: Session) -> None:
    RolloutLoop(session).fit()
