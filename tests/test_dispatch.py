"""The fused switch and the path from opt.step() to the kernels: which ops each optimizer calls on each setting, how
few Python frames of ours lie between step() and the first kernel, what happens when the native library is missing,
and the drop-in conventions (torch's defaults, zero-size parameters, non-finite gradients)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastoptim
from fastoptim import ops

PACKAGE = Path(fastoptim.__file__).parent
SHAPES = [(8, 6), (6, 10), (5,), (3, 2, 2)]
# Options that keep every optimizer's steps short and reach each of its ops within two steps (Mars clips, Soap
# refreshes its eigenbasis on step 2).
OPTIONS = {"soap": dict(block_size=4, precondition_frequency=2), "kron": dict(block_size=4),
           "mars": dict(max_grad_norm=1.0), "muon": dict(ns_dtype=torch.float32), "scion": dict(ns_dtype=torch.float32)}
# Kron computes its preconditioner in float32 blocks whatever the parameters' dtype, so its kernels take them.
FLOAT32_BLOCK_OPS = {"kron": {"kron_update_preconditioner_", "kron_precondition", "kron_balance_"}}


class NativeCalls(TorchDispatchMode):
    """Records the torch.ops.fastoptim ops dispatched while active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastoptim":
            self.names.append(func._schema.name.split("::")[1])
        return func(*args, **(kwargs or {}))


def params_with_grads(gen, dtype=torch.float32, shapes=SHAPES):
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
    return params


def step(opt):
    if opt.needs_hvp and opt.hessian_due:  # Sophia's first step refreshes h: plain gradients stand in for it here
        loss = sum((p * p).sum() for group in opt.param_groups for p in group["params"])
        opt.update_hessian(loss)
    opt.step()


@pytest.mark.parametrize("name", fastoptim.OPTIMIZER_NAMES)
def test_each_optimizer_runs_its_native_ops_unless_told_not_to(name, rng):
    cls = fastoptim.optimizer_class(name)
    for fused in (None, True):
        opt = cls(params_with_grads(rng), fused=fused, **OPTIONS.get(name, {}))
        with NativeCalls() as calls:
            step(opt)
            step(opt)
        assert set(calls.names) >= {op for op in cls.native_ops if op != "kron_balance_"}, (fused, calls.names)
    opt = cls(params_with_grads(rng), fused=False, **OPTIONS.get(name, {}))
    with NativeCalls() as calls:
        step(opt)
        step(opt)
    assert calls.names == []


@pytest.mark.parametrize("name", fastoptim.OPTIMIZER_NAMES)
def test_tensors_the_kernels_lack_run_pure_or_raise_naming_the_op(name, rng):
    cls = fastoptim.optimizer_class(name)
    opt = cls(params_with_grads(rng, torch.float64), **OPTIONS.get(name, {}))
    with NativeCalls() as calls:
        step(opt)
    assert set(calls.names) <= FLOAT32_BLOCK_OPS.get(name, set())
    with pytest.raises(RuntimeError, match=r"fused=True: the native op fastoptim::\w+ takes float32"):
        cls(params_with_grads(rng, torch.float64), fused=True, **OPTIONS.get(name, {}))


def test_mars_fused_steps_and_matches_the_pure_path(rng):
    params = {fused: params_with_grads(torch.Generator().manual_seed(0)) for fused in (True, False)}
    opts = {fused: fastoptim.Mars(ps, lr=0.01, max_grad_norm=1.0, fused=fused) for fused, ps in params.items()}
    for _ in range(4):
        grads = [torch.randn(s, generator=rng) for s in SHAPES]
        for fused, opt in opts.items():
            for p, g in zip(params[fused], grads):
                p.grad = g.clone()
            with NativeCalls() as calls:
                opt.step()
            assert ("mars_adamw_" in calls.names) == fused
    for a, b in zip(params[True], params[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq", "prev_grad"):
            torch.testing.assert_close(opts[True].state[a][key], opts[False].state[b][key], rtol=1e-5, atol=1e-6)


def frames_of_ours_at_first_kernel(run) -> int:
    """Python frames inside the fastoptim package on the stack when the first torch.ops.fastoptim op is called."""
    found = []

    def profile(frame, event, arg):
        if found or event != "call" or frame.f_code.co_name != "__call__":
            return
        op = frame.f_locals.get("self")
        if isinstance(op, torch._ops.OpOverloadPacket) and op._qualified_op_name.startswith("fastoptim::"):
            ours, f = 0, frame.f_back
            while f is not None:
                ours += Path(f.f_code.co_filename).resolve().is_relative_to(PACKAGE)
                f = f.f_back
            found.append(ours)

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    assert found, "no torch.ops.fastoptim op was called"
    return found[0]


def test_adamw_step_reaches_its_kernel_within_five_frames(rng):
    opt = fastoptim.AdamW(params_with_grads(rng))
    assert frames_of_ours_at_first_kernel(opt.step) <= 5


def test_muon_matrix_step_reaches_its_kernel_within_five_frames(rng):
    opt = fastoptim.Muon(params_with_grads(rng, shapes=[(8, 6), (8, 6), (6, 10)]))
    assert frames_of_ours_at_first_kernel(opt.step) <= 5


def test_a_missing_native_library_is_reported_once_and_every_optimizer_still_steps():
    script = """
import sys, warnings
sys.modules["fastoptim._C"] = None  # what an absent or unloadable build looks like to `from fastoptim import _C`
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastoptim
    import fastoptim.ops
import torch
assert not fastoptim.ops.AVAILABLE and "did not load" in fastoptim.ops.UNAVAILABLE_REASON
assert len([w for w in caught if "did not load" in str(w.message)]) == 1, [str(w.message) for w in caught]
p = [torch.nn.Parameter(torch.ones(3))]
p[0].grad = torch.ones(3)
fastoptim.AdamW(p, lr=0.5, weight_decay=0.0).step()
assert torch.allclose(p[0], torch.full((3,), 0.5)), p
try:
    fastoptim.AdamW(p, fused=True)
except RuntimeError as err:
    assert "fused=True: the native op fastoptim::adamw_" in str(err) and "did not load" in str(err), err
else:
    raise AssertionError("fused=True did not raise")
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.parametrize("fused", [None, False])
def test_adamw_with_torchs_arguments_gives_torchs_result(rng, fused):
    params = params_with_grads(rng)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    args = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1)
    ours, theirs = fastoptim.AdamW(params, fused=fused, **args), torch.optim.AdamW(twins, **args)
    for _ in range(8):
        grads = [torch.randn(p.shape, generator=rng) for p in params]
        for p, q, g in zip(params, twins, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_defaults_match_torch_where_torch_ships_the_optimizer():
    p = [torch.nn.Parameter(torch.zeros(2, 2))]
    for ours, theirs in ((fastoptim.AdamW(p), torch.optim.AdamW(p)), (fastoptim.Muon(p), torch.optim.Muon(p))):
        for key, value in theirs.defaults.items():
            if key in ours.defaults:
                assert ours.defaults[key] == value, (type(ours).__name__, key)
    for name in fastoptim.OPTIMIZER_NAMES:
        assert fastoptim.optimizer_class(name)(p).defaults["max_grad_norm"] is None, name


@pytest.mark.parametrize("name", fastoptim.OPTIMIZER_NAMES)
def test_zero_size_parameters_are_skipped(name, rng):
    shapes = [(8, 6), (0, 6), (0,), (5,)]
    params = params_with_grads(rng, shapes=shapes)
    opt = fastoptim.optimizer_class(name)(params, **OPTIONS.get(name, {}))
    before = [p.detach().clone() for p in params]
    step(opt)
    step(opt)
    assert all(p not in opt.state for p in params if p.numel() == 0)
    assert not torch.equal(params[0], before[0]) and not torch.equal(params[3], before[3])


@pytest.mark.parametrize("name", [n for n in fastoptim.OPTIMIZER_NAMES if n != "sophia"])
def test_a_clipped_group_without_gradients_is_left_alone(name, rng):
    """A param group none of whose parameters has a gradient this step (frozen, or all owned by other ranks under
    ZeRO-1), clipped like the rest: the other group steps, this one is untouched and gets no state."""
    stepped, idle = params_with_grads(rng), params_with_grads(rng)
    for p in idle:
        p.grad = None
    opt = fastoptim.optimizer_class(name)([{"params": stepped}, {"params": idle}],
                                          **{**OPTIONS.get(name, {}), "max_grad_norm": 0.5})
    before = [p.detach().clone() for p in stepped + idle]
    opt.step()
    assert all(not torch.equal(p, q) for p, q in zip(stepped, before)), name
    assert all(torch.equal(p, q) and p not in opt.state for p, q in zip(idle, before[len(stepped):])), name


@pytest.mark.parametrize("name", [n for n in fastoptim.OPTIMIZER_NAMES if n != "soap"])
@pytest.mark.parametrize("fused", [None, False])
def test_a_non_finite_gradient_propagates_as_in_torch(name, fused, rng):
    """No error: the NaN reaches the parameter, or the state (a sign update or Cautious's mask zeroes its element,
    as torch.sign(nan) = 0 does)."""
    params = params_with_grads(rng)
    opt = fastoptim.optimizer_class(name)(params, fused=fused, **OPTIONS.get(name, {}))
    step(opt)  # a first step first: Sophia's computes its own gradients from a loss
    params[0].grad = torch.randn(params[0].shape, generator=rng)
    params[0].grad[0, 0] = float("nan")
    opt.step()
    state = [v for v in opt.state[params[0]].values() if v.is_floating_point() and v.numel() > 1]
    assert params[0].isnan().any() or any(v.isnan().any() for v in state)


@pytest.mark.parametrize("fused", [None, False])
def test_soap_names_the_parameter_whose_factorisation_would_fail_and_writes_nothing(fused, rng):
    params = params_with_grads(rng)
    params[1].grad[2, 3] = float("inf")
    opt = fastoptim.Soap(params, block_size=4, fused=fused)
    before = [p.detach().clone() for p in params]
    with pytest.raises(FloatingPointError, match=r"\[1\] \(shape \(6, 10\)\) \(non-finite gradient\).*check_finite"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not opt.state
    # A later refresh from statistics that a NaN reached (check_finite off lets it in) is refused the same way.
    params[1].grad = torch.randn(6, 10, generator=rng)
    opt = fastoptim.Soap(params, block_size=4, precondition_frequency=3, fused=fused)
    opt.step()
    params[0].grad[0, 0] = float("nan")
    opt.step()
    saved = {k: v.clone() for k, v in opt.state[params[0]].items()}
    with pytest.raises(FloatingPointError, match=r"\[0\] \(shape \(8, 6\)\) \(non-finite statistics\)"):
        opt.step()
    for key, value in opt.state[params[0]].items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, equal_nan=True)
