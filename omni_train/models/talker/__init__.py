"""The Talker: sizes (config.py) and their HF configs (hf_config.py), the megatron MoE backbone provider
(backbone.py), the code predictor (code_predictor.py), the conditioning on the Thinker (conditioning.py; the
Thinker's signals captured by thinker_signals.py), the model and its teacher-forced loss (model.py), the
tables two pipeline stages both read (pipeline.py), greedy codec generation (generate.py), transformers'
Code2Wav carried (code2wav.py) and the HF weight tables (weights.py)."""
