"""Conversion between HF Qwen3-Omni / Qwen3-MoE checkpoints and our megatron dist checkpoints
(convert.py: `omni-convert import|export|verify|generate`; talker.py: the Talker and Code2Wav; verify.py and
verify_talker.py; dist_io.py: reading dist checkpoints by global tensor; from_run.py; hf_io.py). Nothing is
imported here, so `python -m omni_train.export.convert` runs the module once."""
