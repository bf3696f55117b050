"""AdamW as one fused elementwise pass per parameter, compiled by inductor on CUDA.

The optimizer step is the largest memory-bound cost of a training step at micro-batch size: at 3B bf16
parameters torch's fused AdamW (a multi-tensor-apply kernel) reads parameter, gradient and both moments and
writes parameter and moments back at ~2 TB/s on an H100, 60% of its bandwidth, and when given a
``grad_scale`` it writes the unscaled gradient back too. The same update as an inductor kernel over each
parameter's flat view streams at close to the bandwidth and writes nothing but the parameter and moments.

``CompiledAdamW`` is torch's AdamW (same hyper-parameters, param groups and state: ``step``, ``exp_avg``,
``exp_avg_sq``, so checkpoints do not change) with its own ``step``. Like torch's fused path it honours
``grad_scale`` (gradients are divided by it) and ``found_inf`` (1: nothing changes, step counts included),
the attributes torch's AMP grad scaler and parallel/update.py set. Computation in fp32 whatever the
storage dtype, rounded once per stored tensor, as torch's fused kernel does. Off CUDA the same function runs
eagerly.
"""

from __future__ import annotations

import torch

from omni_train.kernels.compiled import fused


def adamw_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 count: torch.Tensor, lr: torch.Tensor, beta1: float, beta2: float, eps: float,
                 weight_decay: float, grad_scale: torch.Tensor, found_inf: torch.Tensor) -> None:
    """One AdamW step on flat tensors, in place; ``count`` (0-dim fp32) is this step's number, 1-based.

    The step counter itself is advanced by the caller, after this kernel: written here, it would be read
    by the kernel's other thread blocks after the first ones had updated it (a race)."""
    keep = found_inf != 0
    g = grad.float() / grad_scale
    m = torch.lerp(exp_avg.float(), g, 1.0 - beta1)
    v = exp_avg_sq.float() * beta2 + (1.0 - beta2) * g * g
    bias1 = 1.0 - torch.pow(beta1, count)
    bias2 = 1.0 - torch.pow(beta2, count)
    denom = torch.sqrt(v) / torch.sqrt(bias2) + eps
    p = param.float() * (1.0 - lr * weight_decay) - (lr / bias1) * (m / denom)
    param.copy_(torch.where(keep, param, p.to(param.dtype)))
    exp_avg.copy_(torch.where(keep, exp_avg, m.to(exp_avg.dtype)))
    exp_avg_sq.copy_(torch.where(keep, exp_avg_sq, v.to(exp_avg_sq.dtype)))


# Parameters smaller than this go through torch's multi-tensor fused kernel, all in one launch: a compiled
# call costs ~0.3 ms of host time. At Qwen3-Omni's sizes the compiled path then takes the stacked experts
# and the embedding / output layer (~98% of the LM's elements, ~10 calls); the towers' ~300 tensors of
# 1-5M elements as compiled calls cost 130 ms of host time per step (H100 profile).
COMPILED_MIN_NUMEL = 1 << 24


class CompiledAdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose step runs ``adamw_update`` per large parameter (compiled on CUDA) and
    torch's fused multi-tensor kernel over the small ones."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        scalars = {}  # device -> (grad_scale, found_inf) tensors

        for group in self.param_groups:
            if group.get("amsgrad") or group.get("maximize"):
                raise ValueError("CompiledAdamW does not implement amsgrad or maximize")
            beta1, beta2 = group["betas"]
            lrs, small = {}, {}
            for param in group["params"]:
                if param.grad is None:
                    continue
                device = param.device
                if device not in scalars:
                    scalars[device] = (
                        torch.ones((), device=device) if scale is None else scale.to(device, torch.float32),
                        torch.zeros((), device=device) if found_inf is None else found_inf.to(device, torch.float32),
                    )
                state = self._state(param)
                if param.numel() < COMPILED_MIN_NUMEL:
                    small.setdefault((device, param.dtype), []).append(param)
                    continue
                if device not in lrs:  # a fill kernel, not a host-to-device copy: the host does not wait
                    lrs[device] = torch.full((), float(group["lr"]), dtype=torch.float32, device=device)
                grad_scale, inf = scalars[device]
                fused(adamw_update, device, dynamic=True, tuned=True)(
                    param.view(-1), param.grad.view(-1), state["exp_avg"].view(-1),
                    state["exp_avg_sq"].view(-1), state["step"] + 1.0, lrs[device], beta1, beta2,
                    group["eps"], group["weight_decay"], grad_scale, inf)
                state["step"].add_(1.0 - inf)  # a skipped step (found_inf 1) is not counted
            for (device, _), params in small.items():
                states = [self.state[p] for p in params]
                steps = [s["step"] for s in states]
                torch._foreach_add_(steps, 1.0)
                grad_scale, inf = scalars[device]
                torch._fused_adamw_(
                    params, [p.grad for p in params], [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states], [], steps, lr=float(group["lr"]), beta1=beta1,
                    beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                    maximize=False, grad_scale=grad_scale, found_inf=inf)
                torch._foreach_sub_(steps, [inf] * len(steps))  # a skipped step is not counted
        return loss

    def _state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        for key in ("exp_avg", "exp_avg_sq"):  # megatron's init_state_fn may have made the moments alone
            if key not in state:
                state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
        step = state.get("step", 0.0)
        if (not torch.is_tensor(step) or step.device != param.device or step.dim() != 0
                or step.dtype != torch.float32):
            state["step"] = torch.as_tensor(step, dtype=torch.float32).to(param.device).reshape(())
        return state
