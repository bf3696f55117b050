"""A deterministic, seeded token stream with learnable structure, for text-only runs and tests.

Sample ``i`` depends only on ``(seed, i)``, so a run's data position is just the number of samples it
has consumed: resuming at sample N replays exactly what an uninterrupted run would have seen.
Each sequence concatenates "phrases" drawn from a fixed, seeded vocabulary of patterns, so the next
token is predictable inside a phrase and a model's loss falls well below log(vocab_size).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch

from omni_train.config import DataConfig
from omni_train.data.batch import TextBatch


class SyntheticTextStream:
    def __init__(self, cfg: DataConfig, vocab_size: int, seq_length: int):
        self.seed = cfg.seed
        self.seq_length = seq_length
        rng = np.random.default_rng([cfg.seed, 0x5EED])
        lengths = rng.integers(4, 17, size=cfg.num_patterns)
        self.patterns = [rng.integers(0, vocab_size, size=n) for n in lengths]

    def sample(self, index: int) -> np.ndarray:
        """Token ids of sample ``index``: seq_length + 1 tokens (inputs plus the shifted label)."""
        rng = np.random.default_rng([self.seed, 1, index])
        pieces, total = [], 0
        while total < self.seq_length + 1:
            piece = self.patterns[rng.integers(len(self.patterns))]
            pieces.append(piece)
            total += len(piece)
        return np.concatenate(pieces)[: self.seq_length + 1]

    def batch(self, indices: Sequence[int]) -> TextBatch:
        tokens = torch.from_numpy(np.stack([self.sample(i) for i in indices])).long()
        input_ids, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        positions = torch.arange(self.seq_length).expand_as(input_ids)
        return TextBatch(
            input_ids=input_ids,
            labels=labels,
            loss_mask=torch.ones_like(labels, dtype=torch.float32),
            # Text: temporal, height and width position ids are equal (TM-RoPE reduces to 1D RoPE).
            position_ids=positions.unsqueeze(0).expand(3, -1, -1).contiguous(),
            keys=[f"synthetic:{i}" for i in indices],  # named in non-finite step reports
        )


def step_sample_indices(step: int, global_batch: int, dp_rank: int, dp_size: int,
                        micro_batch: int) -> list[list[int]]:
    """Sample indices of each micro-batch this data-parallel rank runs at optimizer step ``step`` (0-based).

    The global batch of step s is samples [s*G, (s+1)*G); rank r takes the r-th contiguous 1/dp of it,
    so any data-parallel layout sees the same global batch.
    """
    per_rank = global_batch // dp_size
    first = step * global_batch + dp_rank * per_rank
    return [list(range(first + m, first + m + micro_batch)) for m in range(0, per_rank, micro_batch)]


class SyntheticTextSource:
    """Micro-batches of one data-parallel rank, step by step. Its whole state is the step count."""

    def __init__(self, stream: SyntheticTextStream, global_batch: int, micro_batch: int,
                 dp_rank: int, dp_size: int):
        self.stream, self.global_batch, self.micro_batch = stream, global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.step = 0

    def next_microbatches(self) -> List[TextBatch]:
        micro = step_sample_indices(self.step, self.global_batch, self.dp_rank, self.dp_size,
                                    self.micro_batch)
        self.step += 1
        return [self.stream.batch(indices) for indices in micro]

    def state_dict(self) -> Dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.step = state["step"]

    def stats(self) -> Dict[str, float]:
        return {}
