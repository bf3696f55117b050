"""parallel.adamw.CompiledAdamW against torch.optim.AdamW(fused=True): same updates, same state, same
grad_scale / found_inf semantics; and its kernel compiled (inductor's CPU backend) against its eager run."""

import pytest
import torch

from omni_train.kernels.compiled import compiled
from omni_train.parallel import adamw
from omni_train.parallel.adamw import CompiledAdamW, adamw_update


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype)) for shape in ((33, 7), (5,), (2, 3, 4))]


def _run(cls, dtype, scales, found, **kwargs):
    params = _params(dtype)
    opt = cls(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kwargs)
    g = torch.Generator().manual_seed(1)
    for scale, inf in zip(scales, found):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * 3).to(dtype)
        opt.grad_scale = None if scale is None else torch.tensor(scale)
        opt.found_inf = None if inf is None else torch.tensor(inf)
        opt.step()
    return params, opt


@pytest.mark.parametrize("min_numel", [0, 100])  # every parameter compiled-path; the small ones torch's kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_torch_fused_adamw(dtype, min_numel, monkeypatch):
    monkeypatch.setattr(adamw, "COMPILED_MIN_NUMEL", min_numel)
    scales, found = [None, 4.0, 2.5, 1.0], [None, 0.0, 1.0, 0.0]  # the third step is skipped
    ours, ours_opt = _run(CompiledAdamW, dtype, scales, found)
    ref, ref_opt = _run(torch.optim.AdamW, dtype, scales, found, fused=True)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=0, atol=0.0079)  # 1 bf16 ulp at ~1
    for p, r in zip(ours, ref):
        torch.testing.assert_close(p.detach(), r.detach(), **tol)
        state, ref_state = ours_opt.state[p], ref_opt.state[r]
        assert float(state["step"]) == float(ref_state["step"]) == 3  # 4 steps, one skipped
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].dtype == ref_state[key].dtype == dtype
            torch.testing.assert_close(state[key], ref_state[key], **(tol if dtype == torch.float32 else
                                                                       dict(rtol=1e-2, atol=1e-5)))
    assert not torch.equal(ours[0].detach(), _params(dtype)[0])


@pytest.mark.parametrize("min_numel", [0, 100])
def test_skipped_step_changes_nothing(min_numel, monkeypatch):
    monkeypatch.setattr(adamw, "COMPILED_MIN_NUMEL", min_numel)
    params, opt = _run(CompiledAdamW, torch.float32, [None], [None])
    before = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in opt.state[params[0]].items()}
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    opt.grad_scale, opt.found_inf = torch.tensor(float("nan")), torch.tensor(1.0)
    opt.step()
    assert all(torch.equal(b, p.detach()) for b, p in zip(before, params))
    assert all(torch.equal(state[k], opt.state[params[0]][k]) for k in state)


def test_compiled_kernel_equals_eager(inductor_cpu):
    results = []
    for fn in (adamw_update, compiled(adamw_update, True)):
        tensors = [torch.randn(40, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16) for _ in range(2)]
        param, grad = tensors
        exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
        for count in (1.0, 2.0):
            fn(param, grad, exp_avg, exp_avg_sq, torch.tensor(count), torch.tensor(1e-2), 0.9, 0.95, 1e-8, 0.1,
               torch.tensor(2.0), torch.tensor(0.0))
        results.append((param, exp_avg, exp_avg_sq))
    for eager, fused in zip(*results):
        torch.testing.assert_close(fused.float(), eager.float(), rtol=0, atol=0.0079)
