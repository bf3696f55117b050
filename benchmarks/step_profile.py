"""Where one training step's time goes, for benchmarks/thinker_throughput.py: the trainer's parts labelled
for the profiler, one profiled step (host and device time, top kernels and operators, optional Chrome
trace), and the sites of the step's host-device synchronisations."""

from __future__ import annotations

import time
from pathlib import Path


def label_parts(trainer) -> None:
    """Name the parts of the trainer's step in profiles (``bench:<part>``): where the host and the device
    spend the step."""
    import torch

    import omni_train.loops.supervised as loop

    def labelled(label, fn):
        def wrapped(*args, **kwargs):
            with torch.profiler.record_function(f"bench:{label}"):
                return fn(*args, **kwargs)
        return wrapped

    trainer.forward_backward = labelled("forward_backward", trainer.forward_backward)
    trainer.nonfinite.flags = labelled("nonfinite_flags", trainer.nonfinite.flags)
    trainer.model.zero_grad_buffer = labelled("zero_grad_buffer", trainer.model.zero_grad_buffer)
    trainer.report.sums = labelled("loss_sums", trainer.report.sums)
    for name, label in (("grad_norm", "grad_norm"), ("apply_update", "optimizer_step")):
        fn = getattr(loop, name)
        if not hasattr(fn, "__wrapped_by_bench__"):
            setattr(loop, name, labelled(label, fn))
            getattr(loop, name).__wrapped_by_bench__ = True


def profile_step(step, device, top: int = 25, trace_path=None) -> dict:
    """One more step under torch.profiler. On GPU: the device kernels' total time and launch count against
    the step's wall time, the top kernels by time, and the top operators by the device time of the kernels
    they launch themselves (self); on CPU, operators by self CPU time."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    start = time.perf_counter()
    with profile(activities=activities, record_shapes=True) as prof:
        step()
        if on_gpu:
            torch.cuda.synchronize()
    wall = time.perf_counter() - start
    if trace_path:
        prof.export_chrome_trace(str(trace_path))
    events = prof.key_averages()
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"

    def ranked(selected):
        selected = sorted(selected, key=lambda e: getattr(e, key), reverse=True)[:top]
        return [dict(name=e.key[:100], calls=e.count, self_s=getattr(e, key) / 1e6) for e in selected]

    # Device-side ranges such as "Optimizer.step#AdamW.step" or our "bench:*" labels are annotations
    # around kernels, not kernels; "Command Buffer Full" marks the host waiting for room in the launch
    # queue (the GPU is behind).
    kernels = [e for e in events if e.device_type != DeviceType.CPU and "#" not in e.key
               and not e.key.startswith("bench:")]
    ops = [e for e in events if e.device_type == DeviceType.CPU and e.key != "Command Buffer Full"]
    queue_full = sum(e.count for e in events if e.key == "Command Buffer Full")
    out = dict(wall_s=wall, launch_queue_full=queue_full, top_ops=ranked(ops))
    # each labelled part: host time (CPU side) and the span of its kernels (device side)
    out["parts"] = {e.key.removeprefix("bench:") + (".device" if e.device_type != DeviceType.CPU else ".host"):
                    (e.device_time_total if e.device_type != DeviceType.CPU else e.cpu_time_total) / 1e6
                    for e in events if e.key.startswith("bench:")}
    by_host = sorted((e for e in ops if not e.key.startswith("bench:")),
                     key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    out["top_host_ops"] = [dict(name=e.key[:100], calls=e.count, self_s=e.self_cpu_time_total / 1e6)
                           for e in by_host]
    if on_gpu:  # operators by the device time of their own kernels, per input shapes
        shaped = [e for e in prof.key_averages(group_by_input_shape=True)
                  if e.device_type == DeviceType.CPU and not e.key.startswith("bench:")]
        shaped = sorted(shaped, key=lambda e: e.self_device_time_total, reverse=True)[:3 * top]
        out["top_ops_by_shape"] = [dict(name=e.key[:60], shapes=str(e.input_shapes)[:160], calls=e.count,
                                        self_s=e.self_device_time_total / 1e6) for e in shaped]
    if on_gpu:
        out.update(kernel_time_s=sum(e.self_device_time_total for e in kernels) / 1e6,
                   kernel_launches=sum(e.count for e in kernels), top_kernels=ranked(kernels))
    return out


def phase_timeline(trainer, step, device, steps: int = 4) -> dict:
    """Without a profiler (whose per-operator cost inflates host time), ``steps`` steps back to back with
    host clocks and CUDA events at each step's start, the end of its first forward (megatron's forward_step
    returns), of its backward (forward_backward returns), of the grad norm and of the update's launch:
    per step, median over the steps, in ms,

    - ``host_<phase>`` / ``device_<phase>`` for the phases forward, backward, norm, update and rest (the
      update's launch to the next step's start): the host's time to launch the phase, the device's time
      to run it (from finishing the previous phase);
    - ``lag_<mark>``: how far the device is behind the host at each mark (device clocks aligned to host
      clocks at an idle point): near 0 where the device waited for the host to launch work;
    - ``host_step`` / ``device_step``: step start to the next step's start.
    """
    import statistics

    import torch

    import omni_train.loops.supervised as loop

    on_gpu = device.type == "cuda"
    marks = []  # (name, host time, event)

    def mark(name):
        event = None
        if on_gpu:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        marks.append((name, time.perf_counter(), event))

    def marked(name, fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            mark(name)
            return out
        return wrapped

    saved = dict(forward_step=trainer._forward_step, forward_backward=trainer.forward_backward,
                 grad_norm=loop.grad_norm, apply_update=loop.apply_update)
    trainer._forward_step = marked("forward", saved["forward_step"])
    trainer.forward_backward = marked("backward", saved["forward_backward"])
    loop.grad_norm = marked("norm", saved["grad_norm"])
    loop.apply_update = marked("update", saved["apply_update"])
    try:
        if on_gpu:
            torch.cuda.synchronize()
        for _ in range(steps):
            mark("start")
            step()
        mark("start")
        if on_gpu:
            torch.cuda.synchronize()
    finally:
        trainer._forward_step, trainer.forward_backward = saved["forward_step"], saved["forward_backward"]
        loop.grad_norm, loop.apply_update = saved["grad_norm"], saved["apply_update"]
    # the first mark was recorded on an idle device: its event and host clock coincide
    ref_host, ref_event = marks[0][1], marks[0][2]
    starts = [i for i, m in enumerate(marks) if m[0] == "start"]
    rows = {}
    for a, b in zip(starts, starts[1:]):
        seen, step_marks = set(), [marks[a]]
        for m in marks[a + 1:b]:  # the first of each (the first micro-batch's forward)
            if m[0] not in seen:
                seen.add(m[0])
                step_marks.append(m)
        step_marks.append(("rest", marks[b][1], marks[b][2]))
        rows.setdefault("host_step", []).append((marks[b][1] - marks[a][1]) * 1e3)
        if on_gpu:
            rows.setdefault("device_step", []).append(marks[a][2].elapsed_time(marks[b][2]))
        for (_, h0, e0), (name, h1, e1) in zip(step_marks, step_marks[1:]):
            rows.setdefault(f"host_{name}", []).append((h1 - h0) * 1e3)
            if on_gpu:
                rows.setdefault(f"device_{name}", []).append(e0.elapsed_time(e1))
                device_clock = ref_host * 1e3 + ref_event.elapsed_time(e1)
                rows.setdefault(f"lag_{name}", []).append(device_clock - h1 * 1e3)
    return {k: round(statistics.median(v), 2) for k, v in rows.items() if v}


def sync_sites(step, top: int = 15) -> list:
    """One more step with torch's CUDA sync debug mode on: where the host waited for the device (each
    synchronising call, by the innermost omni_train / megatron / transformers frames that led to it), with
    counts."""
    import collections
    import traceback
    import warnings

    import torch

    sites = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1]
                  if any(part in f.filename for part in ("/omni_train/", "/megatron/", "/transformers/"))]
        where = " < ".join(f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno}"
                           for f in reversed(frames[-3:]))
        sites[f"{str(message).split(':')[0][:50]} @ {where or filename}"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [dict(site=site, count=count) for site, count in sites.most_common(top)]


def print_profile(variant: str, prof: dict, syncs: list) -> None:
    print(f"[{variant}] profiled step: wall {prof['wall_s']:.3f}s, kernels {prof.get('kernel_time_s', 0):.3f}s "
          f"in {prof.get('kernel_launches', 0)} launches", flush=True)
    for part, seconds in sorted(prof["parts"].items()):
        print(f"[{variant}] part {part}: {seconds * 1e3:.2f} ms", flush=True)
    for row in prof["top_host_ops"][:10]:
        print(f"[{variant}] host {row['self_s'] * 1e3:9.2f} ms {row['calls']:6d}x {row['name']}", flush=True)
    for row in syncs:
        print(f"[{variant}] sync {row['count']:4d}x {row['site']}", flush=True)
    for row in prof.get("top_ops_by_shape", []):
        print(f"[{variant}] {row['self_s'] * 1e3:9.2f} ms {row['calls']:6d}x {row['name']} {row['shapes']}", flush=True)
    for row in prof.get("top_kernels", [])[:25] + prof["top_ops"][:10]:
        print(f"[{variant}] {row['self_s'] * 1e3:9.2f} ms {row['calls']:6d}x {row['name']}", flush=True)
