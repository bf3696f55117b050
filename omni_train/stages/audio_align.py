"""Stage audio_align: the multimodal Thinker (towers + LM) on packed shards; what differs from
multimodal_pretrain is configuration only (conf/stage/audio_align.yaml: trainable sets and phases; the recipe:
data mixture, sequence length, recomputation)."""

from omni_train.stages.multimodal_pretrain import STAGE  # noqa: F401
