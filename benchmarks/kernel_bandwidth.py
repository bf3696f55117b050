"""Memory bandwidth of the step's largest memory-bound kernels on one GPU (AdamW, the grad norm's
reduction, the MoE combine's gather-sum): what each costs and how far it is from the device's streaming
limit.

    python3 benchmarks/kernel_bandwidth.py [--numel 402653184 201326592 311427072] [--json out.json]

For each flat bf16 parameter size (default: a 30B-A3B layer's stacked expert weights and the embedding)
it times, with CUDA events over ``--iters`` back-to-back calls after warm-up:

- ``copy``: ``dst.copy_(src)`` of the same bytes AdamW moves (read 8, write 6 bytes per element), the
  practical streaming ceiling;
- ``torch_fused``: ``torch._fused_adamw_`` with a grad_scale;
- ``compiled``: ``omni_train.parallel.adamw.adamw_update`` through inductor (what CompiledAdamW runs);
- ``compiled_tuned``: the same with inductor's coordinate-descent tuning of block sizes;
- ``triton_<block>_<warps>``: the same update as a hand-written Triton kernel (exploration).

and for the gradient norm's sum of squares over the same sizes: ``norm_foreach`` (torch's multi-tensor
norm) and ``norm_compiled`` (``parallel.update.square_sum``, tuned); and for the combine of one MoE layer
at the 30B-A3B width (8,192 tokens x top-8, hidden 2,048): ``combine_eager`` and ``combine_compiled``
(``models.common.local_dispatch.sum_copies``) and ``combine_tuned``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def triton_adamw(param, grad, exp_avg, exp_avg_sq, count, lr, beta1, beta2, eps, weight_decay, grad_scale,
                 found_inf, block=2048, warps=8):
    """Exploration: AdamW as a hand-written Triton kernel (same arithmetic as adamw.adamw_update)."""
    import torch
    import triton

    kernel = _triton_kernel()
    step_size = lr / (1.0 - torch.pow(beta1, count))
    bias2_sqrt = torch.sqrt(1.0 - torch.pow(beta2, count))
    n = param.numel()
    kernel[(triton.cdiv(n, block),)](param, grad, exp_avg, exp_avg_sq, n, lr, step_size, bias2_sqrt,
                                     grad_scale, found_inf, beta1, beta2, eps, weight_decay,
                                     BLOCK=block, num_warps=warps)


_KERNEL = []


def _triton_kernel():
    if _KERNEL:
        return _KERNEL[0]
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(p_ptr, g_ptr, m_ptr, v_ptr, n, lr_ptr, step_size_ptr, bias2_sqrt_ptr, scale_ptr, inf_ptr,
               beta1, beta2, eps, weight_decay, BLOCK: tl.constexpr):
        if tl.load(inf_ptr) != 0:
            return
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        lr = tl.load(lr_ptr)
        step_size = tl.load(step_size_ptr)
        bias2_sqrt = tl.load(bias2_sqrt_ptr)
        scale = tl.load(scale_ptr)
        g = tl.load(g_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.float32) / scale
        m = tl.load(m_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
        p = tl.load(p_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * g * g
        denom = tl.sqrt(v) / bias2_sqrt + eps
        p = p * (1.0 - lr * weight_decay) - step_size * (m / denom)
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
        tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)

    _KERNEL.append(kernel)
    return kernel


def timed(fn, iters: int) -> float:
    import torch

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def main() -> None:
    import torch

    from omni_train.parallel import adamw

    p = argparse.ArgumentParser()
    p.add_argument("--numel", type=int, nargs="+", default=[402653184, 201326592, 311427072])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dev = torch.device("cuda")
    rows = []
    for n in args.numel:
        g = torch.Generator(device=dev).manual_seed(0)
        param = torch.randn(n, device=dev, dtype=torch.bfloat16, generator=g)
        grad = torch.randn(n, device=dev, dtype=torch.bfloat16, generator=g)
        m = torch.randn(n, device=dev, dtype=torch.bfloat16, generator=g) * 0.01
        v = torch.rand(n, device=dev, dtype=torch.bfloat16, generator=g) * 0.01
        count = torch.full((), 3.0, device=dev)
        lr = torch.full((), 1e-4, device=dev)
        scale = torch.full((), 2.0, device=dev)
        inf = torch.zeros((), device=dev)
        src = torch.empty(n * 4, device=dev, dtype=torch.bfloat16)
        dst = torch.empty(n * 3, device=dev, dtype=torch.bfloat16)
        args_ = (param, grad, m, v, count, lr, 0.9, 0.95, 1e-8, 0.1, scale, inf)
        compiled = torch.compile(adamw.adamw_update, fullgraph=True, dynamic=True)
        tuned = torch.compile(adamw.adamw_update, fullgraph=True, dynamic=True,
                              options={"coordinate_descent_tuning": True})
        variants = {
            "copy": lambda: dst.copy_(src[n:]),
            "torch_fused": lambda: torch._fused_adamw_(
                [param], [grad], [m], [v], [], [count.clone()], lr=1e-4, beta1=0.9, beta2=0.95,
                weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False, grad_scale=scale, found_inf=inf),
            "compiled": lambda: compiled(*args_),
            "compiled_tuned": lambda: tuned(*args_),
        }
        for block, warps in ((1024, 4), (2048, 8), (4096, 8), (8192, 16)):
            variants[f"triton_{block}_{warps}"] = (
                lambda block=block, warps=warps: triton_adamw(*args_, block=block, warps=warps))
        row = {"numel": n}
        if "triton_2048_8" in variants:  # same result as the compiled kernel?
            a = [t.clone() for t in (param, grad, m, v)]
            b = [t.clone() for t in (param, grad, m, v)]
            compiled(*a, *args_[4:])
            triton_adamw(*b, *args_[4:])
            row["triton_vs_compiled_max_diff"] = [float((x.float() - y.float()).abs().max()) for x, y in zip(a, b)]
            print("triton vs compiled, max |diff| (param, grad, m, v):", row["triton_vs_compiled_max_diff"])
        for name, fn in variants.items():
            seconds = timed(fn, args.iters)
            moved = n * (14 if name != "copy" else 6 * 2)  # copy: reads 3n and writes 3n elements
            row[name] = dict(ms=round(seconds * 1e3, 3), tb_s=round(moved / seconds / 1e12, 3))
            print(f"numel {n:>11,} {name:15s} {seconds * 1e3:7.3f} ms {moved / seconds / 1e12:6.3f} TB/s",
                  flush=True)
        from omni_train.parallel.update import square_sum
        norm_tuned = torch.compile(square_sum, fullgraph=True, dynamic=True,
                                   options={"coordinate_descent_tuning": True})
        for name, fn in {"norm_foreach": lambda: torch._foreach_norm([grad], 2.0, dtype=torch.float32),
                         "norm_compiled": lambda: norm_tuned(grad)}.items():
            seconds = timed(fn, args.iters)
            row[name] = dict(ms=round(seconds * 1e3, 3), tb_s=round(2 * n / seconds / 1e12, 3))
            print(f"numel {n:>11,} {name:15s} {seconds * 1e3:7.3f} ms {2 * n / seconds / 1e12:6.3f} TB/s", flush=True)
        rows.append(row)
    from omni_train.models.common.local_dispatch import sum_copies
    tokens, topk, hidden = 8192, 8, 2048
    rows_ = torch.randn(tokens * topk, hidden, device=dev, dtype=torch.bfloat16)
    inverse = torch.randperm(tokens * topk, device=dev)
    combine = {"combine_eager": sum_copies,
               "combine_compiled": torch.compile(sum_copies, fullgraph=True, dynamic=False),
               "combine_tuned": torch.compile(sum_copies, fullgraph=True, dynamic=False,
                                              options={"coordinate_descent_tuning": True})}
    row = {"combine": [tokens, topk, hidden]}
    for name, fn in combine.items():
        seconds = timed(lambda fn=fn: fn(rows_, inverse, topk), args.iters)
        moved = rows_.numel() * 2 + tokens * hidden * 2
        row[name] = dict(ms=round(seconds * 1e3, 3), tb_s=round(moved / seconds / 1e12, 3))
        print(f"combine {name:17s} {seconds * 1e3:7.3f} ms {moved / seconds / 1e12:6.3f} TB/s", flush=True)
    rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
