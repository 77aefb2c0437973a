"""harness.optim.Adafactor against transformers' Adafactor (the reference: T-Few's optimizer, r-three/t-few
``src/utils/get_optimizer.py``, with ``relative_step=False, warmup_init=False`` and ``scale_parameter`` True or
False), on CPU, no model.

Checks the parameters after every one of 50 scheduled steps (float32 within 1e-6, bfloat16 within tolerance and,
on CPU, bit for bit with the state), parameters without grads (skipped; their own step counts), a state_dict round
trip, and that unfactored parameters go through one foreach pass per group, in a fixed number of ops whatever
their count; each for ``scale_parameter`` True and False.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.optimization import Adafactor as HFAdafactor
from transformers.optimization import get_linear_schedule_with_warmup

from harness.optim import Adafactor

SHAPES = [(7,), (64,), (1,), (300,), (), (16, 24), (3, 5, 6), (33,)]  # 1-D of several sizes, a scalar, 2-D, 3-D


def make_params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def set_grads(params: list[torch.Tensor], step: int, skip: tuple[int, ...] = ()) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=g) * (0.1 + i)  # different scales: some updates clip, some don't
        p.grad = None if i in skip else grad.to(p.dtype)


def hf(params: list[torch.Tensor], lr: float, weight_decay: float, scale_parameter: bool) -> HFAdafactor:
    """T-Few's construction (src/utils/get_optimizer.py): relative_step and warmup_init always False."""
    return HFAdafactor(params, lr=lr, weight_decay=weight_decay, scale_parameter=scale_parameter,
                       relative_step=False, warmup_init=False)


def run(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int, start: int = 0,
        skip: tuple[int, ...] = ()) -> None:
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=5, num_training_steps=50)
    with warnings.catch_warnings():  # resuming: fast-forward the schedule (torch warns: no optimizer.step yet)
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(start):
            sched.step()
    for step in range(start, start + steps):
        set_grads(params, step, skip)
        opt.step()
        sched.step()


def max_rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x.float() - y.float()).abs().max() / y.float().abs().max()).item() for x, y in zip(a, b))


SCALE = pytest.mark.parametrize("scale_parameter", [True, False])


@SCALE
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_equals_transformers_adafactor_after_every_step(weight_decay: float, scale_parameter: bool) -> None:
    """float32 parameters within 1e-6 (relative to the largest element of each) after each of 50 scheduled steps,
    the warmup's first step (lr 0) included; parameters of very different RMS, some below eps[1] = 1e-3 (their
    step size is lr * 1e-3 with scale_parameter), so both branches of HF's max(eps[1], RMS) are taken."""
    ours, ref = make_params(torch.float32), make_params(torch.float32)
    for params in (ours, ref):
        with torch.no_grad():
            params[2].mul_(1e-5)  # RMS below eps[1]
            params[6].mul_(1e-4)
    start = [p.detach().clone() for p in ours]
    opt_ours = Adafactor(ours, lr=3e-2, weight_decay=weight_decay, scale_parameter=scale_parameter)
    opt_ref = hf(ref, lr=3e-2, weight_decay=weight_decay, scale_parameter=scale_parameter)
    sched = [get_linear_schedule_with_warmup(o, num_warmup_steps=5, num_training_steps=50) for o in (opt_ours, opt_ref)]
    worst = 0.0
    for step in range(50):
        for opt, s, params in ((opt_ours, sched[0], ours), (opt_ref, sched[1], ref)):
            set_grads(params, step)
            opt.step()
            s.step()
        worst = max(worst, max_rel_diff(ours, ref))
        assert worst < 1e-6, (step, worst)
    assert all(not torch.equal(p, q) for p, q in zip(ours, start))  # every parameter moved
    # scale_parameter changes the update: the same run with the other setting ends elsewhere
    other = [q.clone() for q in start]
    run(hf(other, lr=3e-2, weight_decay=weight_decay, scale_parameter=not scale_parameter), other, 50)
    assert max_rel_diff(other, ref) > 1e-2


@SCALE
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_transformers_adafactor(dtype: torch.dtype, weight_decay: float, scale_parameter: bool) -> None:
    ours, ref = make_params(dtype), make_params(dtype)
    run(Adafactor(ours, lr=3e-2, weight_decay=weight_decay, scale_parameter=scale_parameter), ours, 50)
    run(hf(ref, lr=3e-2, weight_decay=weight_decay, scale_parameter=scale_parameter), ref, 50)
    assert not any(torch.equal(p, q) for p, q in zip(ours, make_params(dtype)))  # every parameter moved
    if dtype == torch.float32:
        assert max_rel_diff(ours, ref) < 1e-6
    else:  # same ops in float32, rounded to bf16 after each step: at most a few bf16 ulps apart, rarely
        for p, q in zip(ours, ref):
            assert torch.allclose(p.float(), q.float(), rtol=2e-2, atol=1e-2)
        assert max_rel_diff(ours, ref) < 2e-2


@pytest.mark.parametrize("scale_parameter, weight_decay", [(False, 1e-2), (False, 0.0), (True, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_identical_on_cpu_state_included(dtype: torch.dtype, scale_parameter: bool, weight_decay: float) -> None:
    """Bit for bit where the step size is computed as HF computes it (with scale_parameter and weight decay the
    decay's factor is rounded once more here: within 1e-6, test above)."""
    ours, ref = make_params(dtype), make_params(dtype)
    opt_ours = Adafactor(ours, lr=3e-2, weight_decay=weight_decay, scale_parameter=scale_parameter)
    opt_ref = hf(ref, lr=3e-2, weight_decay=weight_decay, scale_parameter=scale_parameter)
    run(opt_ours, ours, 50)
    run(opt_ref, ref, 50)
    assert all(torch.equal(p, q) for p, q in zip(ours, ref))
    for p, q in zip(ours, ref):  # same state as HF's (float32 moments, a Python int step), less the unused "RMS"
        expected = {k: v for k, v in opt_ref.state[q].items() if k != "RMS"}
        assert opt_ours.state[p].keys() == expected.keys() and opt_ours.state[p]["step"] == 50
        for key, value in expected.items():
            assert value == opt_ours.state[p][key] if key == "step" else torch.equal(value, opt_ours.state[p][key])


@SCALE
def test_parameter_without_grad_is_skipped(scale_parameter: bool) -> None:
    ours, ref = make_params(torch.float32), make_params(torch.float32)
    opt = Adafactor(ours, lr=1e-2, scale_parameter=scale_parameter)
    run(opt, ours, 10, skip=(1, 5))
    run(hf(ref, lr=1e-2, weight_decay=0.0, scale_parameter=scale_parameter), ref, 10, skip=(1, 5))
    for i in (1, 5):
        assert len(opt.state[ours[i]]) == 0
        assert torch.equal(ours[i], make_params(torch.float32)[i])
    assert max_rel_diff(ours, ref) < 1e-6


@SCALE
def test_steps_differ_per_parameter_like_transformers(scale_parameter: bool) -> None:
    """A parameter that missed steps has its own step count (and beta2t), as in HF: separate foreach buckets."""
    ours, ref = make_params(torch.float32), make_params(torch.float32)
    opt_ours = Adafactor(ours, lr=1e-2, scale_parameter=scale_parameter)
    opt_ref = hf(ref, lr=1e-2, weight_decay=0.0, scale_parameter=scale_parameter)
    run(opt_ours, ours, 3, skip=(0, 3))
    run(opt_ref, ref, 3, skip=(0, 3))
    run(opt_ours, ours, 5, start=3)
    run(opt_ref, ref, 5, start=3)
    assert opt_ours.state[ours[0]]["step"] == 5 and opt_ours.state[ours[1]]["step"] == 8
    assert all(torch.equal(p, q) for p, q in zip(ours, ref))


@SCALE
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip(dtype: torch.dtype, scale_parameter: bool) -> None:
    straight = make_params(dtype)
    run(Adafactor(straight, lr=1e-2, weight_decay=1e-2, scale_parameter=scale_parameter), straight, 10)

    resumed = make_params(dtype)
    first = Adafactor(resumed, lr=1e-2, weight_decay=1e-2, scale_parameter=scale_parameter)
    run(first, resumed, 5)
    saved = copy.deepcopy(first.state_dict())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in resumed]
    second = Adafactor(resumed, lr=1e-2, weight_decay=1e-2, scale_parameter=not scale_parameter)
    second.load_state_dict(saved)  # the saved groups' options win, scale_parameter included
    assert second.param_groups[0]["scale_parameter"] == scale_parameter
    assert second.state[resumed[0]]["exp_avg_sq"].dtype == torch.float32  # float32 moments, as before saving
    run(second, resumed, 5, start=5)
    assert all(torch.equal(p, q) for p, q in zip(resumed, straight))


@SCALE
def test_foreach_norm_once_per_group(monkeypatch: pytest.MonkeyPatch, scale_parameter: bool) -> None:
    calls: list[int] = []
    real = torch._foreach_norm

    def counting(tensors, *args, **kwargs):
        calls.append(len(tensors))
        return real(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_norm", counting)
    params = make_params(torch.float32)
    opt = Adafactor([{"params": params[:4]}, {"params": params[4:], "lr": 1e-3}], lr=1e-2,
                    scale_parameter=scale_parameter)
    set_grads(params, 0)
    opt.step()
    # group 1: (7,), (64,), (1,), (300,); group 2: (), (33,) -- the >= 2-D ones loop; scale_parameter: the
    # parameters' RMS first, then the updates'
    assert calls == ([4, 4, 2, 2] if scale_parameter else [4, 2])


class OpCounter(TorchDispatchMode):
    """Counts the aten ops a region issues (foreach ops once each: their per-tensor CPU fallback is not seen)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not name.startswith("_record_function"):  # the optimizer's profiler hooks, no compute
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@SCALE
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_count_does_not_grow_with_parameter_count(dtype: torch.dtype, scale_parameter: bool) -> None:
    def ops_per_step(n: int) -> Counter[str]:
        params = [torch.nn.Parameter(torch.randn(16 + i).to(dtype)) for i in range(n)]
        opt = Adafactor(params, lr=1e-2, weight_decay=1e-2, scale_parameter=scale_parameter)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()  # state initialisation and the flat buffers happen here
        with OpCounter() as counter:
            opt.step()
        return counter.ops

    few, many = ops_per_step(3), ops_per_step(90)
    assert few == many, (few, many)
    # 18 ops, each one kernel (bf16: 2 more, casting the concatenated grads and params to float32); scale_parameter:
    # 8 more for the parameters' RMS and step sizes, and 3 more for the weight decay by those step sizes; of them
    # only the _foreach_norm and the _foreach_copy_ into the parameters see them all (a launch per ~100 on CUDA)
    expected = 18 + (2 if dtype == torch.bfloat16 else 0) + (8 + 3 if scale_parameter else 0)
    assert sum(many.values()) == expected, many
    assert {name for name in many if name.startswith("_foreach")} == {"_foreach_norm", "_foreach_copy_"}


IA3_SHAPES = [(12, 1), (12, 1), (1, 20)] * 3  # peft's (IA)3 vectors: keys and values [d, 1], feed-forward [1, d]


@SCALE
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_factored_parameters_equal_transformers(dtype: torch.dtype, weight_decay: float,
                                                        scale_parameter: bool) -> None:
    """Factored parameters of one shape are updated as one stack [M, rows, cols] with per-slice reductions: the
    same parameters and state as HF's one-at-a-time loop (bit for bit on the CPU where the step size is rounded as
    HF rounds it; within 1e-6 with scale_parameter and weight decay, as above)."""
    def fresh() -> list[torch.nn.Parameter]:
        g = torch.Generator().manual_seed(3)
        return [torch.nn.Parameter((torch.randn(s, generator=g) * (1 + i)).to(dtype)) for i, s in enumerate(IA3_SHAPES)]

    ours, ref = fresh(), fresh()
    opt_ours = Adafactor(ours, lr=3e-2, weight_decay=weight_decay, scale_parameter=scale_parameter)
    opt_ref = hf(ref, lr=3e-2, weight_decay=weight_decay, scale_parameter=scale_parameter)
    run(opt_ours, ours, 20)
    run(opt_ref, ref, 20)
    assert not any(torch.equal(p, q) for p, q in zip(ours, fresh()))  # every parameter moved
    if scale_parameter and weight_decay or dtype == torch.bfloat16 and scale_parameter:
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p.float(), q.float(), rtol=1e-6 if dtype == torch.float32 else 2e-2,
                                       atol=1e-7 if dtype == torch.float32 else 1e-2)
        return
    assert all(torch.equal(p, q) for p, q in zip(ours, ref))
    for p, q in zip(ours, ref):
        for key in ("exp_avg_sq_row", "exp_avg_sq_col"):
            assert torch.equal(opt_ours.state[p][key], opt_ref.state[q][key])


@SCALE
def test_op_count_does_not_grow_with_factored_parameters_of_one_shape(scale_parameter: bool) -> None:
    def ops_per_step(copies: int) -> int:
        params = [torch.nn.Parameter(torch.randn(s)) for s in IA3_SHAPES[:3] * copies]
        opt = Adafactor(params, lr=1e-2, weight_decay=1e-2, scale_parameter=scale_parameter)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        with OpCounter() as counter:
            opt.step()
        return sum(counter.ops.values())

    assert ops_per_step(2) == ops_per_step(30)  # 60 key/value and 30 feed-forward vectors: two stacks
