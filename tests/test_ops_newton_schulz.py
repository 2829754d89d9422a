"""newton_schulz_momentum_ and newton_schulz against float64 references written here from benchmark-spec §1.7–§1.8,
through opcheck and FakeTensor, and their refusal of bad input."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastoptim import ops
from fastoptim.optim.functional.newton_schulz import orthogonalized_step_

QUINTIC = (3.4445, -4.7750, 2.0315)


def newton_schulz(x, steps=5, eps=1e-7, *, coefficients=None, norms=None, method="auto"):
    """The op, with the test's defaults; a coefficient schedule may be given as a nested list."""
    if coefficients is not None and not isinstance(coefficients, torch.Tensor):
        coefficients = torch.tensor(coefficients, dtype=torch.float64).reshape(-1, 3)
    return torch.ops.fastoptim.newton_schulz(x, steps, eps, coefficients, norms, method)


def newton_schulz_momentum(bufs, grads, beta, *, nesterov=True, ema=False, dtype=torch.float32):
    return torch.ops.fastoptim.newton_schulz_momentum_(bufs, grads, beta, nesterov, ema, dtype)
# Wide, square and tall, odd sizes included; (m, n) with the iteration on the min(m, n) side.
SHAPES = [(1, 1), (3, 7), (16, 16), (33, 20), (24, 65), (96, 40), (64, 64)]
BATCHES = [1, 2, 5]


# --- float64 references ---------------------------------------------------------------------------------------

def reference_newton_schulz(x, schedule, eps, norms=None):
    """X = x/(‖x‖_F + eps) (or x/(norms + eps)) on the wide orientation, then X ← a·X + (b·A + c·A²)·X, A = X·Xᵀ,
    per (a, b, c)."""
    x = x.double()
    norms = torch.linalg.matrix_norm(x) if norms is None else norms.double()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (norms.view(-1, 1, 1) + eps)
    for a, b, c in schedule:
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def reference_momentum(buf, grad, beta, nesterov, ema):
    """(new buffer, direction): heavy ball buf ← β·buf + g, or EMA buf ← β·buf + (1−β)·g; Nesterov β·buf + w·g."""
    weight = 1 - beta if ema else 1.0
    buf = beta * buf.double() + weight * grad.double()
    return buf, (beta * buf + weight * grad.double() if nesterov else buf)


def scalar_polynomial(sigma, schedule):
    """What the iteration does to each singular value: σ ← a·σ + b·σ³ + c·σ⁵ per step."""
    for a, b, c in schedule:
        sigma = a * sigma + b * sigma**3 + c * sigma**5
    return sigma


# The iteration amplifies rounding by up to a ≈ 3.4 per step. Worst error over 84 random inputs of the shapes below
# (CPU, 5 steps), relative to the output's largest entry: 3e-6 in float32, 4.1e-2 in bfloat16 (the GPU's dtype,
# measured with the CPU kernel on bfloat16); the bounds leave a margin of 10× and 2.4×.
TOLERANCE = {torch.float32: 3e-5, torch.bfloat16: 1e-1}
# Largest deviation of an output singular value from the scalar polynomial of the input's (same measurement, 32×96):
# float32 ~1e-6; bfloat16 2.2e-2 after 5 steps, 1.3e-1 after 10.
SINGULAR_VALUE_SLACK = {(torch.float32, 5): 2e-4, (torch.float32, 10): 2e-4,
                        (torch.bfloat16, 5): 5e-2, (torch.bfloat16, 10): 2.5e-1}


def assert_matches(out, expected, dtype):
    scale = expected.abs().max().item() or 1.0
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=TOLERANCE[dtype] * scale)


def gpu_dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# --- newton_schulz --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", BATCHES)
def test_newton_schulz_matches_float64_reference(device, rng, shape, batch):
    dtype = gpu_dtype(device)
    x = (torch.randn(batch, *shape, generator=rng) * 10 ** torch.empty(batch, 1, 1).uniform_(-3, 3, generator=rng))
    x = x.to(device=device, dtype=dtype)
    out = newton_schulz(x, steps=5, eps=1e-7)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert_matches(out.cpu(), reference_newton_schulz(x.cpu(), [QUINTIC] * 5, 1e-7), dtype)


def test_newton_schulz_many_matrices_one_call(device, rng):
    dtype = gpu_dtype(device)
    x = torch.randn(37, 12, 20, generator=rng).to(device=device, dtype=dtype)
    out = newton_schulz(x, steps=3, eps=1e-5)
    assert_matches(out.cpu(), reference_newton_schulz(x.cpu(), [QUINTIC] * 3, 1e-5), dtype)


def test_newton_schulz_bfloat16_on_cpu(rng):
    # The GPU's operand dtype, on the CPU: the same algorithm within bfloat16's tolerance.
    x = torch.randn(3, 48, 80, generator=rng).bfloat16()
    out = newton_schulz(x, steps=5, eps=1e-7)
    assert out.dtype == torch.bfloat16
    assert_matches(out, reference_newton_schulz(x, [QUINTIC] * 5, 1e-7), torch.bfloat16)


@pytest.mark.parametrize("steps", [0, 1, 4])
def test_per_step_coefficient_schedule(device, rng, steps):
    dtype = gpu_dtype(device)
    schedule = torch.empty(steps, 3, dtype=torch.float64)
    schedule[:, 0].uniform_(1.5, 3.5, generator=rng)
    schedule[:, 1].uniform_(-4.5, -1.0, generator=rng)
    schedule[:, 2].uniform_(0.3, 1.5, generator=rng)
    x = torch.randn(2, 20, 30, generator=rng).to(device=device, dtype=dtype)
    out = newton_schulz(x, steps=steps, eps=1e-7, coefficients=schedule)
    assert_matches(out.cpu(), reference_newton_schulz(x.cpu(), schedule.tolist(), 1e-7), dtype)
    # A nested sequence is accepted too, and a schedule of the default triple equals the default.
    listed = newton_schulz(x, steps=steps, eps=1e-7, coefficients=schedule.tolist())
    torch.testing.assert_close(listed, out, rtol=0, atol=0)
    default = newton_schulz(x, steps=steps, eps=1e-7, coefficients=[QUINTIC] * steps)
    torch.testing.assert_close(default, newton_schulz(x, steps=steps, eps=1e-7), rtol=0, atol=0)


def test_given_norms_replace_the_computed_ones(device, rng):
    dtype = gpu_dtype(device)
    x = torch.randn(3, 16, 24, generator=rng).to(device=device, dtype=dtype)
    norms = torch.rand(3, generator=rng).add_(0.5).to(device) * torch.linalg.matrix_norm(x.float())
    out = newton_schulz(x, steps=2, eps=0.0, norms=norms)
    expected = reference_newton_schulz(x.cpu(), [QUINTIC] * 2, 0.0, norms=norms.cpu())
    assert_matches(out.cpu(), expected, dtype)


@pytest.mark.parametrize("eps", [1e-7, 0.0])
def test_zero_matrix_gives_finite_zeros(device, rng, eps):
    x = torch.randn(3, 8, 12, generator=rng).to(device=device, dtype=gpu_dtype(device))
    x[1] = 0
    out = newton_schulz(x, steps=5, eps=eps)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[0].abs().max() > 0.1


@pytest.mark.parametrize("steps", [5, 10])
def test_singular_values_reach_the_quintic_band(device, rng, steps):
    # Newton–Schulz acts on each singular value alone: the output's singular values are the scalar polynomial of the
    # input's normalised ones, and all lie in the band the polynomial maps [σ_min, 1] to (measured here on a fine
    # grid, no hard-coded band).
    dtype = gpu_dtype(device)
    x = torch.randn(4, 32, 96, generator=rng)  # wide enough that σ_min/‖x‖_F is well away from zero
    out = newton_schulz(x.to(device=device, dtype=dtype), steps=steps, eps=0.0).cpu().double()
    sigma_in = torch.linalg.svdvals(x.double()) / torch.linalg.matrix_norm(x.double()).unsqueeze(-1)
    grid = torch.linspace(sigma_in.min().item(), 1.0, 20001, dtype=torch.float64)
    band = scalar_polynomial(grid, [QUINTIC] * steps)
    low, high = band.min().item(), band.max().item()
    assert 0.5 < low < high < 1.3  # the quintic's known behaviour: near 1, not at 1
    sigma_out = torch.linalg.svdvals(out)
    slack = SINGULAR_VALUE_SLACK[dtype, steps]
    assert sigma_out.min() >= low - slack and sigma_out.max() <= high + slack
    expected = scalar_polynomial(sigma_in, [QUINTIC] * steps).sort(dim=-1, descending=True).values
    torch.testing.assert_close(sigma_out, expected, rtol=0, atol=slack)


@pytest.mark.parametrize("shape", [(64, 64), (128, 96), (96, 256), (1, 96, 64),
                                   pytest.param((2048, 2048), marks=pytest.mark.cuda)])
def test_symmetric_and_plain_methods_agree(device, rng, shape):
    # 2048 rows: method="auto" takes the symmetric tiles there on a GPU. The float64 reference runs on the device.
    shape = shape if len(shape) == 3 else (2 if shape[0] < 2048 else 1, *shape)
    x = torch.randn(*shape, generator=rng).to(device=device, dtype=gpu_dtype(device))
    expected = reference_newton_schulz(x, [QUINTIC] * 5, 1e-7)
    for method in ("plain", "symmetric", "auto"):
        assert_matches(newton_schulz(x, steps=5, method=method), expected, gpu_dtype(device))


def test_symmetric_method_takes_bfloat16_on_the_cpu(rng):
    # The tiles of c·A·A go to a float32 buffer while A is bfloat16.
    x = torch.randn(2, 64, 96, generator=rng).bfloat16()
    expected = reference_newton_schulz(x, [QUINTIC] * 5, 1e-7)
    assert_matches(newton_schulz(x, steps=5, method="symmetric"), expected, torch.bfloat16)


def test_input_is_left_untouched_and_may_be_strided(device, rng):
    x = torch.randn(2, 30, 18, generator=rng).to(device=device, dtype=gpu_dtype(device))
    before = x.clone()
    out = newton_schulz(x.mT, steps=3)  # a transposed view: the op reads strides, it copies anyway
    assert torch.equal(x, before)
    assert_matches(out.cpu(), reference_newton_schulz(x.mT.cpu(), [QUINTIC] * 3, 1e-7), gpu_dtype(device))


# --- newton_schulz_momentum_ ----------------------------------------------------------------------------------

@pytest.mark.parametrize("nesterov, ema", [(True, False), (False, False), (False, True), (True, True)])
@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 2), (70000, 2)])
@pytest.mark.parametrize("batch", [1, 3])
def test_momentum_matches_float64_reference(device, rng, nesterov, ema, shape, batch):
    out_dtype = gpu_dtype(device)
    beta = torch.empty(()).uniform_(0.5, 0.99, generator=rng).item()
    bufs = [torch.randn(shape, generator=rng).to(device) for _ in range(batch)]
    grads = [torch.randn(shape, generator=rng).to(device) for _ in range(batch)]
    expected = [reference_momentum(b.cpu(), g.cpu(), beta, nesterov, ema) for b, g in zip(bufs, grads)]
    directions, norms = newton_schulz_momentum(bufs, grads, beta, nesterov=nesterov, ema=ema, dtype=out_dtype)
    assert directions.shape == (batch, shape[0], bufs[0].numel() // shape[0]) and directions.dtype == out_dtype
    assert norms.shape == (batch,) and norms.dtype == torch.float32
    direction_tol = 1e-6 if out_dtype == torch.float32 else 8e-3
    for i, (buf, direction) in enumerate(expected):
        torch.testing.assert_close(bufs[i].cpu().double(), buf, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(directions[i].cpu().double(), direction.reshape(directions.shape[1:]),
                                   rtol=direction_tol, atol=direction_tol)
        torch.testing.assert_close(norms[i].cpu().double(), direction.norm(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("buffer_dtype, grad_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                      (torch.float16, torch.float16)])
def test_momentum_low_precision_buffers(device, rng, buffer_dtype, grad_dtype):
    bufs = [torch.randn(6, 10, generator=rng).to(device=device, dtype=buffer_dtype) for _ in range(2)]
    grads = [torch.randn(6, 10, generator=rng).to(device=device, dtype=grad_dtype) for _ in range(2)]
    expected = [reference_momentum(b.cpu(), g.cpu(), 0.9, True, False) for b, g in zip(bufs, grads)]
    directions, norms = newton_schulz_momentum(bufs, grads, 0.9, dtype=torch.float32)
    tol = 8e-3 if buffer_dtype == torch.bfloat16 else 1e-3
    for i, (buf, direction) in enumerate(expected):
        torch.testing.assert_close(bufs[i].cpu().double(), buf, rtol=tol, atol=tol)
        torch.testing.assert_close(directions[i].cpu().double(), direction, rtol=2 * tol, atol=2 * tol)
        torch.testing.assert_close(norms[i].cpu().double(), direction.norm(), rtol=2 * tol, atol=tol)


def test_orthogonalized_step_of_no_parameters_does_nothing():
    orthogonalized_step_([], [], [], lr=0.1, beta=0.9, nesterov=True, ema=False, steps=5, eps=1e-7, weight_decay=0.0,
                         scale=1.0, fused=True)


def test_orthogonalized_step_is_momentum_then_newton_schulz_then_update(device, rng):
    dtype = gpu_dtype(device)
    params = [torch.randn(24, 40, generator=rng).to(device) for _ in range(3)]
    grads = [torch.randn(24, 40, generator=rng).to(device) for _ in range(3)]
    bufs = [torch.randn(24, 40, generator=rng).to(device) for _ in range(3)]
    lr, wd, scale, beta = 0.02, 0.1, 1.5, 0.95
    expected = []
    for p, g, b in zip(params, grads, bufs):
        _, direction = reference_momentum(b.cpu(), g.cpu(), beta, True, False)
        ortho = reference_newton_schulz(direction.to(dtype).unsqueeze(0), [QUINTIC] * 5, 1e-7)[0]
        expected.append((p.cpu().double() * (1 - lr * wd) - lr * scale * ortho, ortho))
    orthogonalized_step_(params, grads, bufs, lr=lr, beta=beta, nesterov=True, ema=False, steps=5, eps=1e-7,
                         weight_decay=wd, scale=scale, ns_dtype=dtype, fused=True)
    for p, (new_p, ortho) in zip(params, expected):
        tol = TOLERANCE[dtype] * lr * scale * ortho.abs().max().item() + 1e-6
        torch.testing.assert_close(p.cpu().double(), new_p, rtol=0, atol=tol)


# --- torch.library machinery ----------------------------------------------------------------------------------

def test_opcheck(device, rng):
    dtype = gpu_dtype(device)
    x = torch.randn(3, 10, 6, generator=rng).to(device=device, dtype=dtype)
    norms = torch.linalg.matrix_norm(x.float())
    schedule = torch.tensor([QUINTIC, QUINTIC])
    torch.library.opcheck(torch.ops.fastoptim.newton_schulz.default, (x, 2, 1e-7, schedule, norms, "auto"))
    torch.library.opcheck(torch.ops.fastoptim.newton_schulz.default, (x, 3, 1e-7))
    bufs = [torch.randn(4, 5, generator=rng).to(device) for _ in range(2)]
    grads = [torch.randn(4, 5, generator=rng).to(device) for _ in range(2)]
    torch.library.opcheck(torch.ops.fastoptim.newton_schulz_momentum_.default, (bufs, grads, 0.9, True, False, dtype))


def test_fake_tensor_mode_gives_shapes():
    with FakeTensorMode():
        x = torch.empty(4, 12, 7, dtype=torch.bfloat16)
        out = torch.ops.fastoptim.newton_schulz(x, 5, 1e-7)
        assert out.shape == (4, 12, 7) and out.dtype == torch.bfloat16
        bufs, grads = [torch.empty(6, 2, 3)] * 2, [torch.empty(6, 2, 3)] * 2
        directions, norms = torch.ops.fastoptim.newton_schulz_momentum_(bufs, grads, 0.9, True, False, torch.bfloat16)
        assert directions.shape == (2, 6, 6) and directions.dtype == torch.bfloat16 and norms.shape == (2,)
        with pytest.raises(RuntimeError, match="x has 2 dims"):  # the output's shape depends on it
            torch.ops.fastoptim.newton_schulz(torch.empty(3, 4), 5, 1e-7)


def test_compiles_fullgraph_and_matches_eager(rng):
    bufs = [torch.randn(8, 12, generator=rng) for _ in range(2)]
    grads = [torch.randn(8, 12, generator=rng) for _ in range(2)]
    eager_bufs = [b.clone() for b in bufs]

    def step(bufs, grads):
        directions, norms = torch.ops.fastoptim.newton_schulz_momentum_(bufs, grads, 0.9, True, False, torch.float32)
        return torch.ops.fastoptim.newton_schulz(directions, 5, 1e-7, None, norms)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(bufs, grads), step(eager_bufs, grads))
    for b, e in zip(bufs, eager_bufs):
        torch.testing.assert_close(b, e)


# --- bad input ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x: newton_schulz(x[0]), "x has 2 dims"),
        (lambda x: newton_schulz(x.double()), "x has dtype torch.float64"),
        (lambda x: newton_schulz(x.int()), r"x has dtype torch\.[Ii]nt"),
        (lambda x: newton_schulz(x, steps=-1), "steps is -1"),
        (lambda x: newton_schulz(x, eps=-1.0), "eps is -1"),
        (lambda x: newton_schulz(x, steps=2, coefficients=[QUINTIC]), r"coefficients has shape \[1, 3\]"),
        (lambda x: newton_schulz(x, norms=torch.ones(5)), "norms must be a float32 tensor of shape"),
        (lambda x: newton_schulz(x, norms=torch.ones(2, dtype=torch.float64)), "norms must be a float32"),
        (lambda x: newton_schulz(x, method="symmetric"), "multiple of 32 of at least 64, got 4"),
        (lambda x: newton_schulz(x, method="fast"), "method is 'fast'"),
        (lambda x: newton_schulz(x.to_sparse()), "x is sparse"),
    ],
)
def test_newton_schulz_bad_input_names_the_argument(rng, call, message):
    x = torch.randn(2, 4, 6, generator=rng)
    with pytest.raises(RuntimeError, match=message):
        call(x)


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda b, g: ([b[0], b[1].reshape(3, 8)], [g[0], g[1].reshape(3, 8)]), r"momentum_buffers\[1\] has shape"),
        (lambda b, g: ([b[0].flatten(), b[1].flatten()], [g[0].flatten(), g[1].flatten()]),
         r"momentum_buffers\[0\] has 1 dims"),
        (lambda b, g: (b, g[:1]), "grads has 1 tensors but momentum_buffers has 2"),
        (lambda b, g: (b, [g[0], g[1].flatten()[:20]]), r"grads\[1\] has 20 elements"),
        (lambda b, g: ([b[0].double(), b[1].double()], g), "momentum_buffers has dtype torch.float64"),
        (lambda b, g: ([b[0].bfloat16(), b[1].bfloat16()], [g[0].half(), g[1].half()]), "grads have dtype"),
        (lambda b, g: (b, [g[0], g[1].t()]), r"grads\[1\] is not contiguous"),
        (lambda b, g: (b, [g[0], g[1].to_sparse()]), r"grads\[1\] is sparse"),
    ],
)
def test_momentum_bad_input_names_the_argument_and_writes_nothing(rng, make_bad, message):
    bufs = [torch.randn(4, 6, generator=rng) for _ in range(2)]
    grads = [torch.randn(4, 6, generator=rng) for _ in range(2)]
    bufs, grads = make_bad(bufs, grads)
    before = [b.clone() for b in bufs]
    with pytest.raises(RuntimeError, match=message):
        newton_schulz_momentum(bufs, grads, 0.9)
    for b, saved in zip(bufs, before):
        assert torch.equal(b, saved)


def test_momentum_bad_output_dtype(rng):
    bufs = [torch.randn(4, 6, generator=rng)]
    with pytest.raises(RuntimeError, match="dtype is torch.float64"):
        newton_schulz_momentum(bufs, [torch.randn(4, 6)], 0.9, dtype=torch.float64)


# --- Muon and Scion on these ops ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Muon", "Scion"])
def test_optimizers_fused_path_runs_the_ops_and_matches_the_pure_path(device, rng, name):
    import fastoptim

    shapes = [(24, 40), (24, 40), (64, 16), (8, 3, 5), (33, 33)]  # batched pair, tall, 3-D (read as 8 × 15), odd
    params = {fused: [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)).to(device))
                      for i, s in enumerate(shapes)] for fused in (None, False)}
    # float32 iterations on the CPU, so the paths differ by float32 rounding only; the GPU's bfloat16 otherwise.
    ns_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    opts = {fused: getattr(fastoptim, name)(ps, lr=0.02, momentum=0.9, weight_decay=0.1, ns_dtype=ns_dtype,
                                            fused=fused) for fused, ps in params.items()}
    assert ops.use_native(None, "newton_schulz", params[None])
    for _ in range(3):
        grads = [torch.randn(s, generator=rng).to(device) for s in shapes]
        for fused, ps in params.items():
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opts[fused].step()
    tol = 1e-5 if device.type == "cpu" else 5e-3
    for fast, pure in zip(params[None], params[False]):
        torch.testing.assert_close(fast, pure, rtol=tol, atol=tol)
        torch.testing.assert_close(opts[None].state[fast]["momentum_buffer"], opts[False].state[pure]["momentum_buffer"],
                                   rtol=1e-6, atol=1e-6)
