"""A request's media, as a judge takes them.

A media item is a ``PIL.Image.Image``, ``{"type": "image" | "audio" | "video", "data": bytes, "format":
"png"}`` (the encoded file), ``{"type": ..., "path": "/a/file.jpg"}``, ``{"type": ..., "url": "https://..."}``
or a plain string (a URL, ``data:`` URL or file path; by its extension). An OpenAI-compatible server gets
``image_url`` / ``input_audio`` / ``video_url`` parts with base64 ``data:`` URLs (what `vllm serve` accepts);
a local image-text-to-text judge gets the images as PIL images.
"""

from __future__ import annotations

import base64
import io
import os
from typing import Any, Dict, Tuple

MIME_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp",
              "gif": "image/gif", "wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg",
              "mp4": "video/mp4", "webm": "video/webm"}
KINDS = ("image", "audio", "video")


def _kind_of(fmt: str) -> str:
    mime = MIME_TYPES.get(fmt.lower(), "")
    if not mime:
        raise ValueError(f"media format {fmt!r} unknown; known: {sorted(MIME_TYPES)}")
    return mime.split("/")[0]


def normalize(item: Any) -> Tuple[str, Dict[str, Any]]:
    """(kind, {"data": bytes, "format": ext} or {"url": str}) of one media item (ValueError if not one)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(item, Image.Image):
        buffer = io.BytesIO()
        item.save(buffer, format="PNG")
        return "image", {"data": buffer.getvalue(), "format": "png"}
    if isinstance(item, str):
        if item.startswith(("http://", "https://", "data:")):
            kind = item[5:].split("/")[0] if item.startswith("data:") else _kind_of(item.rsplit(".", 1)[-1])
            return kind, {"url": item}
        item = {"path": item}
    if hasattr(item, "features") and hasattr(item, "kind"):  # data.chat.MediaItem: model inputs, not the file
        raise ValueError(f"{item.kind} {getattr(item, 'name', '')!r} is a MediaItem (processed features, not the "
                         f"encoded file): give the judge {{'type': {item.kind!r}, 'data': bytes, 'format': ext}}, "
                         f"or set judge.send_media=false")
    if not isinstance(item, dict):
        raise ValueError(f"a media item is a PIL image, a dict or a string, not {type(item).__name__}")
    if "path" in item:
        fmt = item.get("format") or os.path.splitext(item["path"])[1].lstrip(".")
        with open(item["path"], "rb") as f:
            item = {"type": item.get("type") or _kind_of(fmt), "data": f.read(), "format": fmt}
    kind = item.get("type") or ""
    if "url" in item:
        return kind or _kind_of(item["url"].rsplit(".", 1)[-1]), {"url": item["url"]}
    if "data" not in item or "format" not in item:
        raise ValueError("a media dict needs 'data' + 'format', 'path' or 'url'")
    return kind or _kind_of(item["format"]), {"data": item["data"], "format": item["format"].lower()}


def openai_part(item: Any) -> Dict[str, Any]:
    """One media item -> an OpenAI chat-completions content part."""
    kind, value = normalize(item)
    if kind not in KINDS:
        raise ValueError(f"media kind {kind!r}, need one of {KINDS}")
    if kind == "audio":
        if "url" in value:
            return {"type": "audio_url", "audio_url": {"url": value["url"]}}
        return {"type": "input_audio", "input_audio": {"data": base64.b64encode(value["data"]).decode("ascii"),
                                                       "format": value["format"]}}
    url = value.get("url") or (f"data:{MIME_TYPES[value['format']]};base64,"
                               f"{base64.b64encode(value['data']).decode('ascii')}")
    field = "image_url" if kind == "image" else "video_url"
    return {"type": field, field: {"url": url}}


def pil_image(item: Any):
    """One image item -> a PIL image (a local image-text-to-text judge); ValueError for other kinds or URLs."""
    from PIL import Image

    if isinstance(item, Image.Image):
        return item.convert("RGB")
    kind, value = normalize(item)
    if kind != "image" or "data" not in value:
        raise ValueError(f"a local judge takes images as data or files, not {kind} {'url' if 'url' in value else ''}")
    return Image.open(io.BytesIO(value["data"])).convert("RGB")
