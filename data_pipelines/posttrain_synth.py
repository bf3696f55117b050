"""Synthetic conversations for the Thinker's post-training stages (`omni-data synth-suite` kinds).

- ``sft``: ChatML conversations of every shape SFT meets: system prompts, multi-turn text, thinking
  responses (a ``<think>`` block) and plain ones, audio, image, video with its audio track, mixed media.
- ``distill``: prompts whose stored ``teacher`` responses come from two teachers in think and no-think
  modes (off-policy distillation trains on them; the sample's own answer is a weaker one).
- ``caption``: audio in, a long detailed description out (the report's Captioner, section 4.3).
- ``gspo``: a verifiable toy task for GSPO: "say the digit N" (text, or with an audio clip or a picture
  beside the words), the reference answer N, scored by ``say_digit_reward`` (a user reward function named
  by module path in recipes/tiny/gspo.yaml); every fourth sample carries its own reward spec.
- ``speech`` / ``long_speech``: spoken answers (the Talker's stages): a question as text, audio or an
  image, the answer as text plus speech with random codec targets (``speech_entry``).

Answers follow from the prompt or the media (sums, durations, sizes), so a tiny model can learn them.
"""

from __future__ import annotations

import os
from typing import List, Tuple

import numpy as np

from data_pipelines.synth import write_audio, write_image, write_video

Entry = Tuple[dict, List[dict]]

SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer briefly and exactly.")


def _user(media: List[dict], text: str) -> dict:
    return {"role": "user", "content": [*media, {"type": "text", "text": text}]}


def _think(reasoning: str, answer: str) -> str:
    return f"<think>\n{reasoning}\n</think>\n\n{answer}"


def sft_entry(i: int, rng, src: str) -> Entry:
    a, b = int(rng.integers(1, 50)), int(rng.integers(1, 50))
    shape = i % 6
    if shape == 0:  # system prompt + multi-turn text
        return {"messages": [{"role": "system", "content": SYSTEM_PROMPTS[i % 2]},
                             {"role": "user", "content": f"What is {a} plus {b}?"},
                             {"role": "assistant", "content": f"{a + b}."},
                             {"role": "user", "content": "And minus 1?"},
                             {"role": "assistant", "content": f"{a + b - 1}."}]}, []
    if shape == 1:  # a thinking response
        return {"messages": [{"role": "user", "content": f"Is {a} bigger than {b}?"},
                             {"role": "assistant", "content": _think(f"Compare {a} with {b}.",
                                                                     "Yes." if a > b else "No.")}]}, []
    if shape == 2:
        seconds = round(float(rng.uniform(1.0, 3.0)), 2)
        name = f"{i}_speech.flac"
        described = write_audio(os.path.join(src, name), rng, seconds, 16000)
        return {"messages": [_user([{"type": "audio", "audio": name}], "How long is the recording?"),
                             {"role": "assistant", "content": f"About {round(seconds)} seconds."}]}, \
            [{**described, "file": name}]
    if shape == 3:
        name = f"{i}_picture.png"
        described = write_image(os.path.join(src, name), rng, "PNG")
        return {"messages": [{"role": "system", "content": SYSTEM_PROMPTS[0]},
                             _user([{"type": "image", "image": name}], "How wide is the picture?"),
                             {"role": "assistant", "content": _think("Read the width.",
                                                                     f"{described['width']} pixels.")}]}, \
            [{**described, "file": name}]
    if shape == 4:
        seconds = 2 + i % 2
        name = f"{i}_clip.mp4"
        described = write_video(os.path.join(src, name), rng, seconds=seconds)
        part = {"type": "video", "video": name, "use_audio_in_video": True}
        return {"messages": [_user([part], "What happens, and what do you hear?"),
                             {"role": "assistant", "content": f"A square crosses in {seconds} seconds; someone hums."}]}, \
            [{**described, "file": name}]
    audio, image = f"{i}_speech.flac", f"{i}_picture.png"
    seconds = round(float(rng.uniform(1.0, 2.0)), 2)
    media = [{**write_audio(os.path.join(src, audio), rng, seconds, 16000), "file": audio},
             {**write_image(os.path.join(src, image), rng, "PNG"), "file": image}]
    return {"messages": [_user([{"type": "audio", "audio": audio}, {"type": "image", "image": image}],
                               "Describe both."),
                         {"role": "assistant", "content": f"{round(seconds)} seconds of speech and a "
                                                          f"{media[1]['width']} pixel wide picture."}]}, media


def distill_entry(i: int, rng, src: str) -> Entry:
    a, b = int(rng.integers(1, 50)), int(rng.integers(1, 50))
    prompt = [{"role": "user", "content": f"What is {a} times {b}?"}]
    answer = f"{a * b}."
    teacher = [{"model": "teacher-large", "mode": "think", "finish_reason": "stop",
                "messages": [{"role": "assistant", "content": _think(f"{a} times {b}.", answer)}]},
               {"model": "teacher-large", "mode": "no_think", "finish_reason": "stop",
                "messages": [{"role": "assistant", "content": answer}]},
               {"model": "teacher-small", "mode": "no_think", "finish_reason": "length",
                "messages": [{"role": "assistant", "content": f"{a} times {b} is"}]}]
    if i % 3 == 2:  # a history turn before the prompt the teachers answered
        prompt = [{"role": "user", "content": "Ready?"}, {"role": "assistant", "content": "Yes."}, *prompt]
    return {"messages": [*prompt, {"role": "assistant", "content": "I think it is large."}],
            "teacher": teacher}, []


CAPTION_PROMPTS = ("Describe the audio in detail.", "Write a detailed caption of this recording.")


def caption_entry(i: int, rng, src: str) -> Entry:
    seconds = round(float(rng.uniform(2.0, 5.0)), 2)
    name = f"{i}_scene.flac"
    described = write_audio(os.path.join(src, name), rng, seconds, 16000)
    caption = (f"A recording of about {round(seconds)} seconds. A single voice speaks in a steady rhythm with "
               f"short pauses; the level stays even, with no music and little background noise. The speech "
               f"sounds synthetic and monotone, close to the microphone, in a small quiet room.")
    return {"messages": [_user([{"type": "audio", "audio": name}], CAPTION_PROMPTS[i % 2]),
                         {"role": "assistant", "content": caption}]}, [{**described, "file": name}]


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def gspo_entry(i: int, rng, src: str) -> Entry:
    digit = int(rng.integers(0, 10))
    words = f"Say the digit {DIGIT_WORDS[digit]}."
    shape, media, content = i % 4, [], words
    if shape == 1:
        name = f"{i}_speech.flac"
        media = [{**write_audio(os.path.join(src, name), rng, 1.0, 16000), "file": name}]
        content = [{"type": "audio", "audio": name}, {"type": "text", "text": words}]
    elif shape == 2:
        name = f"{i}_picture.png"
        media = [{**write_image(os.path.join(src, name), rng, "PNG"), "file": name}]
        content = [{"type": "image", "image": name}, {"type": "text", "text": words}]
    entry = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": f"{digit}"}]}
    if shape == 3:  # a sample's own reward spec: scored by the built-in normalised match beside the task's
        entry["reward"] = {"functions": ["data_pipelines.posttrain_synth:say_digit_reward", "normalized_match"],
                           "weights": {"normalized_match": 0.5}}
    return entry, media


def say_digit_reward(request, **_) -> float:
    """The toy task's reward, graded so that a tiny random model finds a gradient: 1 when the answer (what
    follows a think block) is the reference digit alone, 0.5 when the digit appears in it, 0.1 when some
    other digit does, 0 otherwise."""
    answer = request.response.split("</think>")[-1].strip().rstrip(".")
    digit = (request.reference or "").strip()
    if answer == digit:
        return 1.0
    if digit and digit in answer:
        return 0.5
    return 0.1 if any(c.isdigit() for c in answer) else 0.0


# Speakers of the synthetic speech (the release's voice names: model.talker.codec.speakers).
SPEAKERS = ("chelsie", "ethan", "aiden")
CODEC_FRAME_RATE = 12.5  # codec frames per second (docs/codec.md)
CODE_GROUPS = 16  # codebooks per frame (the Talker's num_code_groups)
SYNTH_CODES = 64  # codes drawn from 0..63 of the 2048: random, yet a marginal a tiny Talker learns in steps


def speech_entry(i: int, rng, src: str, long: bool = False) -> Entry:
    """A conversation whose assistant turn is spoken (the Talker's pretraining data, report section 4.2):
    user turn of text, audio or an image; the answer as text and as speech (a synthetic 24 kHz clip, 1-2.5 s,
    or 8-12 s with ``long``) with random codec targets int32 [ceil(seconds * 12.5), 16] beside it."""
    a, b = int(rng.integers(1, 50)), int(rng.integers(1, 50))
    media, files = [], []
    shape = i % 3
    if shape == 1:
        name = f"{i}_question.flac"
        files.append({**write_audio(os.path.join(src, name), rng, round(float(rng.uniform(1.0, 2.0)), 2), 16000),
                      "file": name})
        media.append({"type": "audio", "audio": name})
    elif shape == 2:
        name = f"{i}_picture.png"
        files.append({**write_image(os.path.join(src, name), rng, "PNG"), "file": name})
        media.append({"type": "image", "image": name})
    prompt = ["Say the sum out loud.", "Answer the recording out loud.", "Describe the picture out loud."][shape]
    seconds = round(float(rng.uniform(8.0, 12.0) if long else rng.uniform(1.0, 2.5)), 2)
    speech, codec = f"{i}_answer.wav", f"{i}_answer_codec.npy"
    files.append({**write_audio(os.path.join(src, speech), rng, seconds, 24000), "file": speech})
    frames = int(np.ceil(files[-1]["seconds"] * CODEC_FRAME_RATE))
    np.save(os.path.join(src, codec), rng.integers(0, SYNTH_CODES, (frames, CODE_GROUPS)).astype(np.int32))
    answer = f"{a} plus {b} is {a + b}." if shape == 0 else f"Answer {i % 10}: {a} and {b}."
    return {"messages": [_user(media, f"{prompt} {a} and {b}?"),
                         {"role": "assistant", "content": [{"type": "text", "text": answer},
                                                           {"type": "audio", "audio": speech, "codec": codec}]}],
            "speaker": {"id": SPEAKERS[i % len(SPEAKERS)]}}, files


def speech_preference_entry(i: int, rng, src: str) -> Entry:
    """A preference pair of spoken answers (the Talker's DPO data): ``speech_entry``'s conversation up to its
    user turn, and two spoken versions of its answer (the same text and audio) whose codec targets differ in a
    way a tiny Talker can learn to prefer: the chosen one's codes lie in 0..15, the rejected one's in 48..63."""
    entry, files = speech_entry(i, rng, src)
    reply = entry["messages"][-1]
    frames = int(np.ceil(files[-1]["seconds"] * CODEC_FRAME_RATE))
    sides = {}
    for side, low in (("chosen", 0), ("rejected", SYNTH_CODES - 16)):
        codec = f"{i}_{side}_codec.npy"
        np.save(os.path.join(src, codec), rng.integers(low, low + 16, (frames, CODE_GROUPS)).astype(np.int32))
        content = [dict(part, codec=codec) if part.get("type") == "audio" else part for part in reply["content"]]
        sides[side] = [{"role": "assistant", "content": content}]
    os.remove(os.path.join(src, reply["content"][1]["codec"]))
    return {"messages": entry["messages"][:-1], "preference": sides, "speaker": entry["speaker"]}, files
