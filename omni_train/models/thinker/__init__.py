"""The Thinker: its MoE LM provider (lm.py), the multimodal model with towers (omni.py), the HF name table
(bridge.py), the HF config mapping (hf_config.py), TM-RoPE position ids (rope_index.py) and tower plans."""
