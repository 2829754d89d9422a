"""decoupled_update_: the foundation op, against a float64 reference, through opcheck, compile and FakeTensor."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from elementwise_cases import scalar

# Math is float32: p·(1 − lr·λ) and lr·u are each rounded, so a float32 result is off by up to 2^-24·(|p| + lr·|u|),
# more than its own ulp where the two nearly cancel; a low-precision parameter by at most its own rounding.
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}
# Odd sizes, an empty tensor, and one spanning several 65536-element chunks.
SHAPES = [(1,), (7, 3), (0,), (33, 65), (3 * 65536 + 5,)]


def reference(p, u, lr, wd, scale):
    return p.double() * (1 - lr * wd) - lr * scale * u.double()


def make_lists(shapes, param_dtype, update_dtype, device, rng):
    params = [torch.randn(s, generator=rng).to(device=device, dtype=param_dtype) for s in shapes]
    updates = [torch.randn(s, generator=rng).to(device=device, dtype=update_dtype) for s in shapes]
    return params, updates


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("same_dtype_updates", [True, False])
def test_matches_float64_reference(device, rng, param_dtype, same_dtype_updates):
    update_dtype = param_dtype if same_dtype_updates else torch.float32
    params, updates = make_lists(SHAPES, param_dtype, update_dtype, device, rng)
    lr, wd, scale = 0.05 + torch.rand((), generator=rng).item(), 0.1, 1.7
    expected = [reference(p, u, lr, wd, scale) for p, u in zip(params, updates)]
    torch.ops.fastoptim.decoupled_update_(params, updates, scalar(lr, device), wd, scale)
    for p, e in zip(params, expected):
        assert p.dtype == param_dtype
        torch.testing.assert_close(p.double(), e, rtol=TOLERANCE[param_dtype], atol=TOLERANCE[param_dtype])


def test_lr_from_device_tensor(device, rng):
    params, updates = make_lists([(10,)], torch.float32, torch.float32, device, rng)
    expected = reference(params[0], updates[0], 0.25, 0.0, 1.0)
    torch.ops.fastoptim.decoupled_update_(params, updates, torch.tensor(0.25, device=device), 0.0, 1.0)
    torch.testing.assert_close(params[0].double(), expected, rtol=TOLERANCE[torch.float32],
                               atol=TOLERANCE[torch.float32])


def test_many_tensors_span_several_launches(device, rng):
    # More tensors than one CUDA launch's metadata holds (110 at depth 1, 64 at depth 2).
    sizes = torch.randint(1, 6, (150,), generator=rng).tolist()
    params, updates = make_lists([(n,) for n in sizes], torch.float32, torch.float32, device, rng)
    expected = [reference(p, u, 0.3, 0.2, 1.0) for p, u in zip(params, updates)]
    torch.ops.fastoptim.decoupled_update_(params, updates, scalar(0.3, device), 0.2, 1.0)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.double(), e, rtol=TOLERANCE[torch.float32], atol=TOLERANCE[torch.float32])


def same_values(actual, expected):
    """Bitwise equal, except that any NaN matches any NaN (a NaN's payload is not part of the contract)."""
    both_nan = actual.isnan() & expected.isnan()
    bits = {2: torch.int16, 4: torch.int32}[actual.element_size()]
    return bool(((actual.view(bits) == expected.view(bits)) | both_nan).all())


# The CPU kernels convert elements with their own code (bfloat16: branch-free bit arithmetic in
# csrc/common/multi_tensor.h; float16: x86's conversion instructions 16 or 8 at a time and that bit arithmetic for the
# rest, in csrc/cpu/half_conversion.cpp), so the conversions are tested on every value they can meet, against torch's,
# with the values in one tensor and cut into tensors of 15 and of 7 elements, which take the narrower paths.
PIECES = [None, 15, 7]


def pieces(values, length):
    return [values] if length is None else list(values.split(length))


@pytest.mark.parametrize("piece", PIECES)
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16])
def test_every_low_precision_value_survives_the_float32_round_trip(device, param_dtype, piece):
    every_value = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(param_dtype).to(device)
    params = [p.clone() for p in pieces(every_value, piece)]
    # p·(1 − 0) − 0·0 = p exactly, so the result is the value converted to float32 and back.
    torch.ops.fastoptim.decoupled_update_(params, [torch.zeros(p.shape, device=device) for p in params],
                                          scalar(0.0, device), 0.0, 1.0)
    assert same_values(torch.cat(params), every_value)


@pytest.mark.parametrize("piece", PIECES)
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16])
def test_float32_results_round_to_nearest_even_like_torch(device, rng, param_dtype, piece):
    random_bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=rng, dtype=torch.int64)
    dropped_bits = 16 if param_dtype == torch.bfloat16 else 13  # float32 mantissa bits the type lacks
    # Values exactly halfway between two neighbours of the low-precision type, and one float32 ulp either side.
    representable = torch.randn(20_000, generator=rng).to(param_dtype).float()
    half_ulp = (representable.view(torch.int32) & ~((1 << dropped_bits) - 1)) | (1 << (dropped_bits - 1))
    ties = torch.cat([half_ulp - 1, half_ulp, half_ulp + 1]).view(torch.float32)
    finfo = torch.finfo(param_dtype)
    edges = torch.tensor([finfo.max, finfo.tiny, finfo.smallest_normal / 2 ** (24 - dropped_bits), 65504.0, 65519.99,
                          65520.0, 3.4e38, float("inf"), float("nan")])
    targets = torch.cat([random_bits.to(torch.int32).view(torch.float32), ties, edges, -edges])
    # −0 is left out: 0·1 − (−1)·(−0) is +0 in IEEE arithmetic, so no update can produce it.
    targets = targets[(targets != 0) | ~targets.signbit()].to(device)
    updates = pieces(targets, piece)
    params = [torch.zeros(u.shape, dtype=param_dtype, device=device) for u in updates]
    # p = 0·1 − (1·(−1))·u = u exactly in float32, so the result is u rounded to the parameters' dtype.
    torch.ops.fastoptim.decoupled_update_(params, updates, scalar(1.0, device), 0.0, -1.0)
    assert same_values(torch.cat(params), targets.to(param_dtype))


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda p, u: (p, u[:1]), "updates has 1 tensors but params has 2"),
        (lambda p, u: (p, [u[0], u[1][:-1]]), r"updates\[1\] has \d+ elements"),
        (lambda p, u: ([p[0].double(), p[1].double()], u), "params has dtype torch.float64"),
        (lambda p, u: (p, [u[0].double(), u[1].double()]), "updates has dtype torch.float64"),
        (lambda p, u: ([p[0], p[1].half()], u), r"params\[1\] has dtype torch.float16"),
        (lambda p, u: (p, [u[0], u[1].t()]), r"updates\[1\] is not contiguous"),
        (lambda p, u: (p, [u[0], u[1].to_sparse()]), r"updates\[1\] is sparse"),
        (lambda p, u: (p, [u[0].bfloat16(), u[1].bfloat16()]), "expected float32 or the parameters' dtype"),
    ],
)
def test_bad_input_names_the_argument_and_writes_nothing(rng, make_bad, message):
    params, updates = make_lists([(4, 3), (5, 6)], torch.float32, torch.float32, "cpu", rng)
    params, updates = make_bad(params, updates)
    before = [p.clone() for p in params]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastoptim.decoupled_update_(params, updates, scalar(0.1, 'cpu'), 0.0, 1.0)
    for p, b in zip(params, before):
        assert torch.equal(p, b)


def test_bad_lr(rng):
    params, updates = make_lists([(3,)], torch.float32, torch.float32, "cpu", rng)
    with pytest.raises(RuntimeError, match="lr must be a 0-dim float32 tensor"):
        torch.ops.fastoptim.decoupled_update_(params, updates, torch.tensor([0.1, 0.2]), 0.0, 1.0)


@pytest.mark.cuda
def test_mixed_devices_refused(rng):
    params, updates = make_lists([(3,), (3,)], torch.float32, torch.float32, "cpu", rng)
    with pytest.raises(RuntimeError, match=r"params\[1\] is on cuda"):
        torch.ops.fastoptim.decoupled_update_([params[0], params[1].cuda()], updates, scalar(0.1, 'cpu'), 0.0, 1.0)


def test_opcheck(device, rng):
    params, updates = make_lists([(5, 4), (17,)], torch.float32, torch.float32, device, rng)
    lr = torch.tensor(0.01, device=device)
    torch.library.opcheck(torch.ops.fastoptim.decoupled_update_.default, (params, updates, lr, 0.1, 2.0))


def test_fake_tensor_mode_runs_the_fake_kernel():
    with FakeTensorMode():
        params = [torch.empty(4, 3), torch.empty(5)]
        updates = [torch.empty(4, 3), torch.empty(5)]
        assert torch.ops.fastoptim.decoupled_update_(params, updates, torch.tensor(0.1), 0.0, 1.0) is None


def test_compiles_fullgraph_and_matches_eager(device, rng):
    params, updates = make_lists([(8, 8), (3,)], torch.float32, torch.float32, device, rng)
    eager = [p.clone() for p in params]
    lr = torch.tensor(0.1, device=device)

    def step(ps, us, lr):
        torch.ops.fastoptim.decoupled_update_(ps, us, lr, 0.01, 1.0)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for value in (0.1, 0.2):  # a changed lr value must not need a recompile: it is read from the tensor
        lr.fill_(value)
        compiled(params, updates, lr)
        step(eager, updates, lr)
    for p, e in zip(params, eager):
        torch.testing.assert_close(p, e)


@pytest.mark.cuda
def test_cuda_kernel_agrees_with_an_independent_cupy_computation(rng):
    """A cross-check outside torch: CuPy reads the same device memory through DLPack and computes the update itself."""
    cp = pytest.importorskip("cupy")
    params, updates = make_lists([(4099,), (3, 77)], torch.float32, torch.float32, "cuda", rng)
    lr, wd, scale = 0.07, 0.2, 1.3
    expected = [cp.asarray(p) * (1 - lr * wd) - lr * scale * cp.asarray(u) for p, u in zip(params, updates)]
    torch.ops.fastoptim.decoupled_update_(params, updates, scalar(lr, 'cuda'), wd, scale)
    for p, e in zip(params, expected):
        assert cp.allclose(cp.asarray(p), e, rtol=1e-6, atol=1e-6)
