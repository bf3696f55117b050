"""Conversion between HF Qwen3-Omni / Qwen3-MoE checkpoints and our megatron dist checkpoints."""

from omni_train.export.convert import export_hf, import_hf, main

__all__ = ["export_hf", "import_hf", "main"]
