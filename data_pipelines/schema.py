"""The sample JSON schema of docs/data_format.md, checked without heavy dependencies.

Used by `omni-data build` (on manifest entries, where media values are file paths) and by
`omni-data validate` and the train-time loader (on shard samples, where media values name members).
Only the standard library is imported here.
"""

import re

ROLES = ("system", "user", "assistant")
MEDIA_KINDS = ("audio", "image", "video")
PART_TYPES = ("text",) + MEDIA_KINDS
MEDIA_EXTS = {"audio": ("flac", "wav", "mp3"), "image": ("jpg", "png", "webp"), "video": ("mp4", "webm")}
MEMBER_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
MEDIA_SUFFIX = re.compile(r"^(audio|image|video)\d+\.([a-z0-9]+)$")
CODEC_SUFFIX = re.compile(r"^codec\d+\.npy$")
SPEAKER_SUFFIX = "spk.npy"
TEACHER_MODES = ("think", "no_think")
FINISH_REASONS = ("stop", "length")
LOGPROBS_FIELDS = ("tokens", "top_ids", "top_logprobs")
LOGPROBS_SUFFIX = re.compile(r"^teacher(\d+)_(tokens|top_ids|top_logprobs)\.npy$")


def sample_key(member_name):
    """WebDataset key of a tar member: its name up to the first dot."""
    return member_name.split(".", 1)[0]


def member_suffix(member_name):
    """What follows the key: `s00000042.audio0.flac` -> `audio0.flac`."""
    return member_name.split(".", 1)[1] if "." in member_name else ""


def message_lists(sample):
    """Yield (where, list of messages) for the conversation, teacher responses and preference turns."""
    yield "messages", sample.get("messages")
    teacher = sample.get("teacher")
    if isinstance(teacher, list):
        for i, entry in enumerate(teacher):
            if isinstance(entry, dict):
                yield f"teacher[{i}].messages", entry.get("messages")
    preference = sample.get("preference")
    if isinstance(preference, dict):
        for side in ("chosen", "rejected"):
            yield f"preference.{side}", preference.get(side)


def iter_parts(sample):
    """Yield (where, role, part) for every content part given as a dict, in order."""
    for where, messages in message_lists(sample):
        if not isinstance(messages, list):
            continue
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("content"), list):
                continue
            for j, part in enumerate(message["content"]):
                if isinstance(part, dict):
                    yield f"{where}[{i}].content[{j}]", message.get("role"), part


def check_sample(sample, members=None):
    """Problems with a sample, as readable strings (empty when it is valid).

    members: None for a manifest entry (media values are paths, not checked here); for a shard sample,
    the set of member suffixes the sample has (`{"json", "audio0.flac", ...}`): then media values must be
    well-formed member suffixes that exist.
    """
    if not isinstance(sample, dict):
        return [f"sample must be a JSON object, got {type(sample).__name__}"]
    errors = []
    for where, messages in message_lists(sample):
        errors += _check_messages(where, messages, required=where == "messages")
    errors += _check_extras(sample)
    if not errors:
        for where, role, part in iter_parts(sample):
            errors += _check_part(where, role, part, members)
        errors += _check_speaker_ref(sample, members)
        errors += _check_logprobs_refs(sample, members)
    return errors


def _check_messages(where, messages, required):
    if messages is None and not required:
        return [f"{where}: missing"]
    if not isinstance(messages, list) or not messages:
        return [f"{where}: must be a non-empty list of messages"]
    errors = []
    for i, message in enumerate(messages):
        at = f"{where}[{i}]"
        if not isinstance(message, dict):
            errors.append(f"{at}: message must be an object")
            continue
        if message.get("role") not in ROLES:
            errors.append(f"{at}.role: {message.get('role')!r} is not one of {', '.join(ROLES)}")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or not content:
            errors.append(f"{at}.content: must be a string or a non-empty list of parts")
            continue
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                errors.append(f"{at}.content[{j}]: part type {kind!r} is not one of {', '.join(PART_TYPES)}")
    return errors


def _check_extras(sample):
    errors = []
    speaker = sample.get("speaker")
    if speaker is not None:
        if not isinstance(speaker, dict) or not (speaker.get("id") or speaker.get("embedding")):
            errors.append("speaker: must be an object with `id` and/or `embedding`")
        elif "id" in speaker and not isinstance(speaker["id"], str):
            errors.append("speaker.id: must be a string")
    teacher = sample.get("teacher")
    if teacher is not None and (not isinstance(teacher, list) or not all(isinstance(t, dict) for t in teacher)):
        errors.append("teacher: must be a list of objects with `messages`")
    elif teacher is not None:
        for i, entry in enumerate(teacher):
            errors += _check_teacher_fields(f"teacher[{i}]", entry)
    preference = sample.get("preference")
    if preference is not None and not isinstance(preference, dict):
        errors.append("preference: must be an object with `chosen` and `rejected`")
    if "meta" in sample and not isinstance(sample["meta"], dict):
        errors.append("meta: must be an object")
    return errors


def _check_teacher_fields(where, entry):
    errors = []
    if not isinstance(entry.get("model"), str) or not entry["model"]:
        errors.append(f"{where}.model: must be a non-empty string (the teacher's name)")
    if "mode" in entry and entry["mode"] not in TEACHER_MODES:
        errors.append(f"{where}.mode: {entry['mode']!r} is not one of {', '.join(TEACHER_MODES)}")
    if "finish_reason" in entry and entry["finish_reason"] not in FINISH_REASONS:
        errors.append(f"{where}.finish_reason: {entry['finish_reason']!r} is not one of {', '.join(FINISH_REASONS)}")
    logprobs = entry.get("logprobs")
    if logprobs is not None and (not isinstance(logprobs, dict) or sorted(logprobs) != sorted(LOGPROBS_FIELDS)):
        errors.append(f"{where}.logprobs: must be an object with exactly {', '.join(LOGPROBS_FIELDS)}")
    return errors


def _check_logprobs_refs(sample, members):
    """Each teacher entry's `logprobs` names its own members: `teacher{i}_{field}.npy`, i its index."""
    errors = []
    for i, entry in enumerate(sample.get("teacher") or []):
        if members is None and entry.get("logprobs") is not None:
            errors.append(f"teacher[{i}].logprobs: not taken from a manifest (omni-data teacher-responses "
                          f"writes them into a built dataset)")
            continue
        for field, value in (entry.get("logprobs") or {}).items():
            match = LOGPROBS_SUFFIX.match(value) if isinstance(value, str) else None
            if not match or match.groups() != (str(i), field):
                errors.append(f"teacher[{i}].logprobs.{field}: {value!r} must be 'teacher{i}_{field}.npy'")
            elif value not in members:
                errors.append(f"teacher[{i}].logprobs.{field}: points to missing member {value!r}")
    return errors


def _check_part(where, role, part, members):
    kind = part["type"]
    value = part.get(kind)
    if not isinstance(value, str) or not value:
        return [f"{where}: {kind} part needs a non-empty string `{kind}`"]
    if kind == "text":
        return []
    errors = []
    if "codec" in part and not (kind == "audio" and role == "assistant"):
        errors.append(f"{where}: `codec` is only allowed on assistant audio parts")
    if "use_audio_in_video" in part and (kind != "video" or not isinstance(part["use_audio_in_video"], bool)):
        errors.append(f"{where}: `use_audio_in_video` must be a boolean on a video part")
    if members is None:
        if "codec" in part and (not isinstance(part["codec"], str) or not part["codec"]):
            errors.append(f"{where}: `codec` must be a path to a .npy file")
        return errors
    match = MEDIA_SUFFIX.match(value)
    if not match or match.group(1) != kind or match.group(2) not in MEDIA_EXTS[kind]:
        exts = "|".join(MEDIA_EXTS[kind])
        errors.append(f"{where}: {kind} value {value!r} is not a member name like {kind}0.{{{exts}}}")
    elif value not in members:
        errors.append(f"{where}: points to missing member {value!r}")
    codec = part.get("codec")
    if codec is not None:
        if not isinstance(codec, str) or not CODEC_SUFFIX.match(codec):
            errors.append(f"{where}: codec value {codec!r} is not a member name like codec0.npy")
        elif codec not in members:
            errors.append(f"{where}: codec points to missing member {codec!r}")
    return errors


def _check_speaker_ref(sample, members):
    speaker = sample.get("speaker")
    embedding = speaker.get("embedding") if isinstance(speaker, dict) else None
    if embedding is None:
        return []
    if not isinstance(embedding, str) or not embedding:
        return ["speaker.embedding: must be a string"]
    if members is None:
        return []
    if embedding != SPEAKER_SUFFIX:
        return [f"speaker.embedding: {embedding!r} must be {SPEAKER_SUFFIX!r}"]
    if embedding not in members:
        return [f"speaker.embedding: points to missing member {embedding!r}"]
    return []


def referenced_members(sample):
    """Member suffixes a (valid) shard sample refers to, in order, without repeats."""
    names = []
    for _, _, part in iter_parts(sample):
        if part["type"] != "text":
            names.append(part[part["type"]])
            if part.get("codec"):
                names.append(part["codec"])
    speaker = sample.get("speaker")
    if isinstance(speaker, dict) and speaker.get("embedding"):
        names.append(speaker["embedding"])
    for entry in sample.get("teacher") or []:
        names += [entry["logprobs"][field] for field in LOGPROBS_FIELDS] if entry.get("logprobs") else []
    return list(dict.fromkeys(names))


def sample_text(sample):
    """All text of the conversation `messages` (what the text token estimate counts)."""
    chunks = []
    for message in sample.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chunks.append(content)
        elif isinstance(content, list):
            chunks += [p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text"]
    return chunks
