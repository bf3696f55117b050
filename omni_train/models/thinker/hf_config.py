"""The transformers thinker config of our towers, from our sizes and the data's placeholder token ids."""

from __future__ import annotations

from typing import Any, Dict


def hf_thinker_config(model_cfg, token_ids: Dict[str, int]) -> Dict[str, Any]:
    """The transformers thinker config (as a dict) of the towers: sizes from ``model_cfg``, output width
    the LM's hidden size, placeholder ids from the data's tokenizer. Its text_config is not read."""
    audio, vision = model_cfg.audio_tower, model_cfg.vision_tower
    return dict(
        audio_config=dict(
            num_mel_bins=audio.num_mel_bins, encoder_layers=audio.num_layers, d_model=audio.d_model,
            encoder_attention_heads=audio.num_heads, encoder_ffn_dim=audio.ffn_dim,
            output_dim=model_cfg.hidden_size, n_window=audio.n_window, n_window_infer=audio.n_window_infer,
            downsample_hidden_size=audio.downsample_hidden_size,
            max_source_positions=audio.max_source_positions,
        ),
        vision_config=dict(
            depth=vision.depth, hidden_size=vision.hidden_size, num_heads=vision.num_heads,
            intermediate_size=vision.intermediate_size, patch_size=vision.patch_size,
            spatial_merge_size=vision.spatial_merge_size, temporal_patch_size=vision.temporal_patch_size,
            num_position_embeddings=vision.num_position_embeddings, out_hidden_size=model_cfg.hidden_size,
            deepstack_visual_indexes=list(vision.deepstack_visual_indexes),
        ),
        audio_token_id=token_ids["audio_pad"], image_token_id=token_ids["image_pad"],
        video_token_id=token_ids["video_pad"], vision_start_token_id=token_ids["vision_start"],
        audio_start_token_id=token_ids["audio_start"],
    )
