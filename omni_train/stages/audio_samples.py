"""Spoken samples at the end of a Talker stage: a few conversations of the stage's data answered by the trained
Talker (greedy codes, transformers' rules: models/talker/generate.py) and turned into speech by the run's
Code2Wav, written as 24 kHz 16-bit WAVs to ``<run_dir>/audio/`` and logged to W&B as audio.

For each sample ``<key>_generated.wav`` (the Talker's own codes) and ``<key>_target.wav`` (the data's codes
through the same Code2Wav: what the Talker was taught), with ``audio/samples.jsonl`` naming each file's
conversation, voice, frame count and whether generation stopped at codec eos. Written by rank 0 of a run that
holds the whole Talker (tp = pp = 1); skipped, and said so, without a Code2Wav (``model.code2wav`` or one
carried from an import) or with ``stage.audio_samples.count=0``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Tuple

import torch

from omni_train.data.batch import to_device
from omni_train.models.common.moe_load import uncounted
from omni_train.models.talker.code2wav import SAMPLE_RATE, write_wav
from omni_train.models.talker.conditioning import build_context
from omni_train.models.talker.generate import greedy_codes

def _speak(code2wav, codes: torch.Tensor) -> torch.Tensor:
    """[K, G] codes -> [n] waveform (empty for no frames)."""
    if codes.shape[0] == 0:
        return torch.zeros(0)
    return code2wav.decode(codes.T.unsqueeze(0).long())[0, 0]


def write_audio_samples(session) -> List[Tuple[str, Path]]:
    """(caption, WAV) of the samples written (none where skipped); rank 0 writes, every rank may call."""
    cfg, env = session.cfg, session.env
    spec = cfg.stage.audio_samples
    module = getattr(session.model, "module", session.model)
    if not env.is_main or spec.count == 0:
        return []
    if getattr(module, "code2wav", None) is None:
        session.say("audio samples: skipped (no Code2Wav: set model.code2wav, or start from an import that has one)")
        return []
    if cfg.parallel.tp > 1 or cfg.parallel.pp > 1:
        session.say("audio samples: skipped (generation needs the whole Talker on one rank: tp = pp = 1)")
        return []
    out_dir = session.run_dir / "audio"
    out_dir.mkdir(parents=True, exist_ok=True)
    talker = module.talker
    batch = to_device(session.data.next_microbatches()[0], env.device)
    written, records = [], []
    was_training = talker.training
    talker.eval()
    try:
        with torch.no_grad(), uncounted():
            samples = module.samples(batch, module.thinker_signals(batch))
            for key, sample in list(zip(batch["keys"], samples))[:spec.count]:
                context = build_context(talker, talker.cfg, sample)
                positions = None if sample.position_ids is None else sample.position_ids[:, :context.inputs_embeds.shape[0]]
                # greedy_codes' last step never becomes a frame: one more than the longest answer allowed
                codes = greedy_codes(talker, context, spec.max_frames + 1, context_positions=positions)
                for kind, frames in (("generated", codes), ("target", sample.codes)):
                    path = out_dir / f"step_{session.state.step:08d}_{key}_{kind}.wav"
                    write_wav(path, _speak(module.code2wav.module, frames))
                    written.append((f"{cfg.stage.name} step {session.state.step}: {key} ({kind})", path))
                records.append({"key": key, "speaker": int(sample.speaker), "generated_frames": int(codes.shape[0]),
                                "target_frames": int(sample.codes.shape[0]),
                                "stopped_at_eos": int(codes.shape[0]) < spec.max_frames,
                                "files": [str(p.name) for _, p in written[-2:]]})
    finally:
        talker.train(was_training)
    with open(out_dir / "samples.jsonl", "a") as f:
        f.writelines(json.dumps({"step": session.state.step, **r}) + "\n" for r in records)
    if session.logger is not None:
        session.logger.log_audio(session.state.step, written, SAMPLE_RATE)
    session.say(f"audio samples: {len(written)} WAVs ({SAMPLE_RATE} Hz) in {out_dir}")
    return written
