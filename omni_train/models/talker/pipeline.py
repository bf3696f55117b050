"""The Talker's tables that two pipeline stages read, kept in step as megatron keeps tied word embeddings.

Under pipeline parallelism the first stage builds the sequence (projections, ``codec_embedding`` rows, the
code predictor's residual ``codec_embedding`` rows) and the last runs ``codec_head``, the code predictor
and the loss. Two tables are read on both: ``codec_embedding`` (the first stage's input frames; the last
stage's code predictor input emb(c0)) and the code predictor's residual tables (the first stage's input
frames; the last stage's code predictor inputs). Every stage that lacks one holds a copy:

    stage      codec embedding                          residual tables
    first      backbone.embedding.word_embeddings       residual_tables (copy)
    middle     codec_table (copy)                       residual_tables (copy)
    last       codec_table (copy)                       code_predictor.codec_embedding

All of them are marked ``pipeline_parallel`` and the backbone's config ``has_cond_embedder``: megatron's
``finalize_model_grads`` then sums their gradients over the pipeline group (the same tables in the same
order on every stage: the codec table, then the residual tables), so every copy takes the same step. The
copies are also marked ``shared`` (megatron's grad-norm counts each table once) and start from the owner's
values (``sync_copies``). In checkpoints a copy is a non-main replica of its owner's key.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.tensor_parallel import VocabParallelEmbedding
from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint
from torch import nn

CODEC_KEY = "backbone.embedding.word_embeddings.weight"
RESIDUAL_KEY = "code_predictor.codec_embedding.{}.weight"


def codec_table_copy(config, codec_vocab_size: int, hidden_size: int) -> VocabParallelEmbedding:
    """A vocabulary-parallel codec embedding of the backbone's shape and split (values come from
    ``sync_copies`` or a checkpoint)."""
    return VocabParallelEmbedding(codec_vocab_size, hidden_size, init_method=config.init_method, config=config)


def residual_tables_copy(num_residual: int, codebook_size: int, hidden_size: int) -> nn.ModuleList:
    return nn.ModuleList(nn.Embedding(codebook_size, hidden_size) for _ in range(num_residual))


def shared_tables(talker) -> List[torch.Tensor]:
    """This stage's codec table, then its residual tables (owner or copy): the order the pipeline sum reads."""
    backbone = talker.backbone
    codec = backbone.embedding.word_embeddings if backbone.pre_process else talker.codec_table
    residual = talker.code_predictor.codec_embedding if talker.code_predictor is not None else talker.residual_tables
    return [codec.weight] + [table.weight for table in residual]


def mark_shared_tables(talker) -> None:
    """Mark the tables for megatron's pipeline gradient sum (and copies as shared). pp > 1 only."""
    talker.backbone.config.has_cond_embedder = True
    for weight in shared_tables(talker):
        weight.pipeline_parallel = True
    for copy in _copies(talker):
        for weight in copy.parameters():
            weight.shared = True


@torch.no_grad()
def sync_copies(talker) -> None:
    """Copies take their owner's values: the codec table from the first stage, the residual tables from
    the last (every stage takes part in both broadcasts, in that order)."""
    group = parallel_state.get_pipeline_model_parallel_group()
    tables = shared_tables(talker)
    torch.distributed.broadcast(tables[0], parallel_state.get_pipeline_model_parallel_first_rank(), group=group)
    for table in tables[1:]:
        torch.distributed.broadcast(table, parallel_state.get_pipeline_model_parallel_last_rank(), group=group)


def copy_sharded_state(talker, prefix: str) -> Dict[str, ShardedTensor]:
    """Checkpoint entries of this stage's copies: non-main replicas of their owners' keys (loaded, never
    written), under the copies' own state-dict keys."""
    dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    state = {}
    if getattr(talker, "codec_table", None) is not None:
        state[f"{prefix}codec_table.weight"] = make_tp_sharded_tensor_for_checkpoint(
            talker.codec_table.weight, f"{prefix}{CODEC_KEY}", replica_id=(1, 0, dp_rank))
    if getattr(talker, "residual_tables", None) is not None:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        for j, table in enumerate(talker.residual_tables):
            state[f"{prefix}residual_tables.{j}.weight"] = ShardedTensor.from_rank_offsets(
                f"{prefix}{RESIDUAL_KEY.format(j)}", table.weight, replica_id=(1, tp_rank, dp_rank))
    return state


def _copies(talker) -> List[nn.Module]:
    return [m for m in (getattr(talker, "codec_table", None), getattr(talker, "residual_tables", None))
            if m is not None]
