import numpy as np
import pytest

from omni_train.config import SyntheticTextDataConfig as DataConfig
from omni_train.data.synthetic_text import SyntheticTextStream, step_sample_indices


def test_samples_depend_only_on_seed_and_index():
    a = SyntheticTextStream(DataConfig(seed=3), vocab_size=100, seq_length=32)
    b = SyntheticTextStream(DataConfig(seed=3), vocab_size=100, seq_length=32)
    assert np.array_equal(a.sample(17), b.sample(17))
    assert not np.array_equal(a.sample(17), a.sample(18))
    c = SyntheticTextStream(DataConfig(seed=4), vocab_size=100, seq_length=32)
    assert not np.array_equal(a.sample(17), c.sample(17))
    batch = a.batch([0, 1])
    assert batch["input_ids"].shape == (2, 32) and batch["position_ids"].shape == (3, 2, 32)
    assert (batch["labels"][:, :-1] == batch["input_ids"][:, 1:]).all()
    assert batch["input_ids"].max() < 100


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_every_rank_layout_covers_the_global_batch_once(dp):
    for step in range(3):
        seen = [i for rank in range(dp) for micro in step_sample_indices(step, 16, rank, dp, 2) for i in micro]
        assert sorted(seen) == list(range(step * 16, (step + 1) * 16))
