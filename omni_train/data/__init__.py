"""Data sources: conf/data/<name>.yaml <-> the builder registered here."""

from __future__ import annotations


def build_source(cfg, env):
    """This data-parallel rank's batch source for the run (see omni_train/stages/__init__.py)."""
    trainer = cfg.trainer
    if cfg.data.name == "synthetic_text":
        from omni_train.data.synthetic_text import SyntheticTextSource, SyntheticTextStream

        stream = SyntheticTextStream(cfg.data, cfg.model.thinker.vocab_size, trainer.seq_length)
        return SyntheticTextSource(stream, trainer.global_batch_size, trainer.micro_batch_size,
                                   env.dp_rank, env.dp_size)
    if cfg.data.name == "shards":
        from omni_train.data.shards import ShardSource

        per_rank = trainer.global_batch_size // env.dp_size
        return ShardSource(cfg.data, trainer.seq_length, trainer.micro_batch_size,
                           per_rank // trainer.micro_batch_size, env.dp_rank, env.dp_size)
    raise ValueError(f"data.name: unknown data source {cfg.data.name!r}")
