"""The one place where training metrics are computed and written: console, metrics.jsonl, W&B, plot."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from omni_train.config import LoggerConfig, ThinkerConfig

# Dense bf16 tensor-core peak used for MFU, FLOP/s per device (H100/H200 SXM datasheet).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def flops_per_token(model: ThinkerConfig, seq_length: int) -> float:
    """Training FLOPs per token (forward + backward), Megatron's MoE formula (a dense LM: its MLP in place of
    the top-k experts, no router).

    6 * (active linear parameters per token) for the projections, routed SwiGLU experts (3 matrices,
    top-k of them), router and output layer, plus the causal core attention 6 * L * S * q_dim
    (QK^T and AV, half of the S x S square on average).
    """
    h, layers = model.hidden_size, model.num_layers
    q_dim = model.num_attention_heads * model.head_dim
    kv_dim = model.num_query_groups * model.head_dim
    attention = h * (2 * q_dim + 2 * kv_dim)
    experts = 3 * h * model.router_topk * model.moe_ffn_hidden_size
    router = h * model.num_experts
    if model.num_experts == 0:  # a dense LM: one SwiGLU MLP per layer, no router
        experts, router = 3 * h * model.ffn_hidden_size, 0
    linear = layers * (attention + experts + router) + h * model.vocab_size
    return 6.0 * linear + 6.0 * layers * seq_length * q_dim


def _half(n: int) -> int:
    """Output length of a kernel-3, stride-2, padding-1 convolution (the AuT front end's)."""
    return (n - 1) // 2 + 1


def _segments(total: int, size: int) -> List[int]:
    """``total`` split into pieces of ``size`` and a remainder (attention windows)."""
    return [size] * (total // size) + ([total % size] if total % size else [])


def audio_tower_flops(model: ThinkerConfig, num_frames: int) -> float:
    """Training FLOPs (forward + backward) of the audio encoder (AuT, transformers'
    ``Qwen3OmniMoeAudioEncoder``) on one audio input of ``num_frames`` log-mel frames; the same
    convention as ``flops_per_token``: 6 x multiply-accumulates (2 per MAC forward, x3 with backward),
    convolutions and attention scores / values included, norms and activations not.

    With M mel bins, C = downsample_hidden_size, d = d_model, F = ffn_dim, H = the LM's hidden size:

    - front end, per chunk: the frames are cut into chunks of 2 * n_window (the last one shorter, then
      padded to the longest, so every chunk costs a chunk of length Lp = min(T, 2 * n_window)); three
      3x3 stride-2 convolutions (1 -> C -> C -> C channels) halve mel and time each time
      (f_i, t_i = half(f_{i-1}), half(t_{i-1}) from f_0 = M, t_0 = Lp), then a linear C * f_3 -> d
      on each of the t_3 positions: 9 C f_1 t_1 + 9 C^2 (f_2 t_2 + f_3 t_3) + t_3 C f_3 d MACs;
    - N tokens (the valid positions: half(half(half(len))) per chunk, 13 per full chunk) through
      ``num_layers`` layers of 4 d^2 (q, k, v, out) + 2 d F (fc1, fc2) MACs per token, plus windowed
      bidirectional attention: windows of W = half^3(Lp) * (n_window_infer // (2 n_window)) tokens
      (the last shorter), 2 d w^2 MACs (QK^T and AV) per window w;
    - output projections d -> d -> H per token: N (d^2 + d H).

    Exact for one input, or for inputs that each have at least 2 * n_window frames (a batch pads its
    chunks to its longest chunk).
    """
    a = model.audio_tower
    chunk = 2 * a.n_window
    chunks = _segments(num_frames, chunk)
    padded = max(chunks)
    f1, t1 = _half(a.num_mel_bins), _half(padded)
    f2, t2 = _half(f1), _half(t1)
    f3, t3 = _half(f2), _half(t2)
    c, d = a.downsample_hidden_size, a.d_model
    front = len(chunks) * (9 * c * f1 * t1 + 9 * c * c * (f2 * t2 + f3 * t3) + t3 * c * f3 * d)
    tokens = sum(_half(_half(_half(n))) for n in chunks)
    window = _half(_half(_half(padded))) * (a.n_window_infer // chunk)
    attention = 2 * d * sum(w * w for w in _segments(tokens, window))
    layers = a.num_layers * (tokens * (4 * d * d + 2 * d * a.ffn_dim) + attention)
    head = tokens * (d * d + d * model.hidden_size)
    return 6.0 * (front + layers + head)


def vision_tower_flops(model: ThinkerConfig, grid_thw: Sequence[int], in_channels: int = 3) -> float:
    """Training FLOPs (forward + backward) of the vision encoder (ViT, transformers'
    ``Qwen3OmniMoeVisionEncoder``) on one image or video of ``grid_thw`` = (t, h, w) patches (an image
    is t = 1: its frame repeated over the temporal patch); the convention of ``audio_tower_flops``.

    With P = t h w patches, d = hidden_size, I = intermediate_size, m = spatial_merge_size,
    H = the LM's hidden size, k = len(deepstack_visual_indexes):

    - patch embedding (a Conv3d with kernel = stride = (temporal_patch_size, patch_size, patch_size)):
      P * (in_channels * temporal_patch_size * patch_size^2) * d MACs;
    - ``depth`` blocks of 4 d^2 (qkv, proj) + 2 d I (fc1, fc2) MACs per patch, plus bidirectional
      attention within each frame (t segments of h w patches): 2 d (h w)^2 MACs per frame;
    - the merger and the k DeepStack mergers, each on P / m^2 merged tokens of width m^2 d:
      (m^2 d)^2 + m^2 d H MACs per merged token.
    """
    v = model.vision_tower
    t, h, w = (int(x) for x in grid_thw)
    patches, d, wide = t * h * w, v.hidden_size, v.spatial_merge_size ** 2 * v.hidden_size
    embed = patches * in_channels * v.temporal_patch_size * v.patch_size ** 2 * d
    attention = t * 2 * d * (h * w) ** 2
    blocks = v.depth * (patches * (4 * d * d + 2 * d * v.intermediate_size) + attention)
    mergers = (1 + len(v.deepstack_visual_indexes)) * (patches // v.spatial_merge_size ** 2) * (
        wide * wide + wide * model.hidden_size)
    return 6.0 * (embed + blocks + mergers)


def device_peak_flops() -> Optional[float]:
    """Peak bf16 FLOP/s of the current GPU, or None when unknown (CPU runs report no MFU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


class DeviceTimer:
    """Time spent in a region of a step, on the device: CUDA events around each pass (no host sync while
    the step runs; ``seconds()`` waits for the last one), host time on a CPU. ``reset()`` between steps."""

    def __init__(self):
        self._spans: List[tuple] = []
        self._open = None

    def __enter__(self) -> "DeviceTimer":
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._open = start
        else:
            self._open = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if isinstance(self._open, float):
            self._spans.append((self._open, time.perf_counter()))
        else:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._spans.append((self._open, end))
        self._open = None

    def seconds(self) -> float:
        total = 0.0
        for start, end in self._spans:
            if isinstance(start, float):
                total += end - start
            else:
                end.synchronize()
                total += start.elapsed_time(end) / 1e3
        return total

    def reset(self) -> None:
        self._spans = []


class Throughput:
    """Tokens/s, achieved TFLOP/s and MFU over the steps since the last report."""

    def __init__(self, model: ThinkerConfig, seq_length: int, world_size: int):
        self.flops_per_token = flops_per_token(model, seq_length)
        self.peak = device_peak_flops()
        self.world_size = world_size
        self.reset()

    def reset(self) -> None:
        self.tokens = 0
        self.start = time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def report(self) -> Dict[str, float]:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        tokens_per_s = self.tokens / seconds
        flops_per_device = tokens_per_s * self.flops_per_token / self.world_size
        out = {"tokens_per_s": tokens_per_s, "tflops_per_device": flops_per_device / 1e12}
        if self.peak:
            out["mfu"] = flops_per_device / self.peak
        self.reset()
        return out


class MetricsLogger:
    """Writes each logged step to the console and <run_dir>/metrics.jsonl, and to W&B when chosen.

    Only rank 0 holds one; other ranks log nothing.
    """

    def __init__(self, cfg: LoggerConfig, run_dir: Path, resolved_config: Dict[str, Any]):
        self.path = run_dir / "metrics.jsonl"
        self.run_dir = run_dir
        _end_line(self.path)
        self.wandb = None
        if cfg.name == "wandb":
            import wandb  # imported here: logger=none runs never need it

            stage = resolved_config.get("stage") or {}
            self.wandb = wandb.init(
                project=cfg.project, entity=cfg.entity, mode=cfg.mode, name=cfg.run_name,
                dir=str(run_dir), config=resolved_config,
                id=_stable_run_id(run_dir), resume="allow",
                group=cfg.group, job_type=cfg.job_type or stage.get("name"),
            )

    def log(self, step: int, values: Dict[str, Any]) -> None:
        record = {"step": step, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(_format(record), flush=True)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def log_audio(self, step: int, samples: List[Tuple[str, Path]], sample_rate: int) -> None:
        """(caption, WAV path) pairs heard at ``step``: listed in <run_dir>/audio_samples.jsonl (metrics.jsonl
        keeps one numeric record per step: readers key it by step) and logged to W&B as ``audio_samples``."""
        record = {"step": step, "sample_rate": sample_rate,
                  "samples": [{"caption": caption, "path": str(path)} for caption, path in samples]}
        with open(self.run_dir / "audio_samples.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            import wandb

            audio = [wandb.Audio(str(path), sample_rate=sample_rate, caption=caption) for caption, path in samples]
            self.wandb.log({"audio_samples": audio}, step=step)

    def finish(self) -> None:
        plot_loss_curve(self.path, self.run_dir / "loss_curve.png")
        if self.wandb is not None:
            self.wandb.finish()


def _end_line(path: Path) -> None:
    """End a last line cut short by a kill mid-write, so a resumed run's records start on lines of their own."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")


def _stable_run_id(run_dir: Path) -> str:
    """One W&B run per run directory, so a resumed job continues the same W&B run."""
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]


def _format(record: Dict[str, Any]) -> str:
    parts = []
    for key, value in record.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        elif not isinstance(value, (list, dict)):
            parts.append(f"{key}={value}")
    return " | ".join(parts)


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """Every record, in file order. A line cut short by a kill mid-write does not parse and is dropped
    (the resumed run logs that step again)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def plot_loss_curve(metrics_path: Path, out_path: Path) -> None:
    """Loss against step for every record in metrics.jsonl (a resumed run's steps included)."""
    if not metrics_path.exists():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_step = {r["step"]: r["loss"] for r in read_metrics(metrics_path) if "loss" in r}
    steps = sorted(by_step)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [by_step[s] for s in steps])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(metrics_path.parent.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
