"""Preference pairs of spoken answers -> the Talker DPO stage's micro-batches (``talker_dpo``).

A sample (docs/data_format.md) holds ``messages`` ending with the user turn and ``preference``: ``chosen`` and
``rejected``, each the assistant turn(s) that complete it, the last one spoken with codec targets (what
``omni-data preference-pairs`` writes). Each side becomes the conversation ``messages + side``, encoded exactly as
a Talker pretraining sample (``talker_batch.encode_speech_sample``: the same checks, ids, positions, codes and
speaker), with only the media that side names. A pair whose either side cannot train the Talker raises
``SampleError`` naming the side, so the loader skips and counts the pair (``data_skipped``): never half a pair.

Micro-batch: ``talker_batch.collate_rows`` of the micro-batch's chosen rows, then its rejected rows (row b and
row B + b are one pair: same context, same speaker), with ``pairs`` = B. ``trainer.micro_batch_size`` and
``global_batch_size`` count pairs.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List

from omni_train.data.decode import _parse_json, _referenced_members
from omni_train.data.errors import SampleError
from omni_train.data.talker_batch import SpeechSource, collate_rows, encode_speech_sample

SIDES = ("chosen", "rejected")


def preference_sides(raw: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """webdataset's raw sample -> {side: the raw sample of conversation ``messages + preference[side]``}, each
    with the members its JSON names; SampleError for a malformed ``preference``."""
    key = str(raw.get("__key__", "?"))
    sample = _parse_json(key, raw)
    preference = sample.get("preference")
    if not isinstance(preference, dict):
        raise SampleError(key, "json", "no 'preference' object (chosen / rejected assistant turns): the talker_dpo "
                                       "stage reads preference pairs (omni-data preference-pairs)")
    messages = sample["messages"]
    if not messages or messages[-1].get("role") != "user":
        raise SampleError(key, "json", "'messages' of a preference sample must end with the user turn that "
                                       "'preference.chosen' / 'preference.rejected' answer")
    out = {}
    for side in SIDES:
        turns = preference.get(side)
        if not isinstance(turns, list) or not turns or any(t.get("role") != "assistant" for t in turns):
            raise SampleError(key, "json", f"preference.{side} must be a non-empty list of assistant turns")
        whole = {k: v for k, v in sample.items() if k != "preference"}
        whole["messages"] = messages + turns
        names = _referenced_members(whole)
        out[side] = {**{k: v for k, v in raw.items() if k.startswith("__") or k in names},
                     "json": json.dumps(whole).encode("utf-8")}
    return out


def encode_preference_sample(raw: Dict[str, Any], **encode) -> Dict[str, Dict[str, Any]]:
    """One pair's rows {side: encode_speech_sample's row}; SampleError naming the side that fails."""
    rows = {}
    for side, side_raw in preference_sides(raw).items():
        try:
            rows[side] = encode_speech_sample(side_raw, **encode)
        except SampleError as exc:
            raise SampleError(exc.key, exc.member, f"preference.{side}: {exc.reason}") from None
    return rows


def collate_pairs(pairs: List[Dict[str, Dict[str, Any]]], pad_id: int) -> Dict[str, Any]:
    batch = collate_rows([pair["chosen"] for pair in pairs] + [pair["rejected"] for pair in pairs], pad_id)
    batch["pairs"] = len(pairs)
    return batch


class PreferenceSource(SpeechSource):
    """This data-parallel rank's DPO micro-batches (``micro_batch`` pairs each); state and stats as
    SpeechSource's."""

    encode = staticmethod(encode_preference_sample)
    collate = staticmethod(collate_pairs)
