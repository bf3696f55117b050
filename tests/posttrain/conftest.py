"""Fixtures of the post-training tests: the synthetic post-training data and its tokenizer, made once."""

import pytest


@pytest.fixture(scope="session")
def posttrain_root(tmp_path_factory):
    """`omni-data synth-suite` of the post-training kinds once: ROOT/sft, ROOT/distill, ROOT/caption and
    ROOT/tokenizer (byte-level BPE with Qwen's special tokens, <think> and </think>)."""
    from data_pipelines.pretrain_synth import synth_suite

    root = tmp_path_factory.mktemp("posttrain")
    synth_suite(str(root), {"sft": 12, "distill": 9, "caption": 4})
    return root
