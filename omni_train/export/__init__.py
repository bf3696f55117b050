"""Conversion between HF Qwen3-Omni / Qwen3-MoE checkpoints and our megatron dist checkpoints
(convert.py: `omni-convert import|export|verify|generate`; verify.py; from_run.py; hf_io.py). Nothing is
imported here, so `python -m omni_train.export.convert` runs the module once."""
