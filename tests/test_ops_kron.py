"""PSGD-Kron's ops against float64 references written from benchmark-spec §1.9, through opcheck and FakeTensor."""

import math
import pathlib
import shutil
import subprocess

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastoptim.ops  # noqa: F401  (loads the native library)

kron_precondition = torch.ops.fastoptim.kron_precondition
kron_balance_ = torch.ops.fastoptim.kron_balance_


def kron_update_preconditioner_(grads, factors, noise, damping, *, precond_lr):
    torch.ops.fastoptim.kron_update_preconditioner_(grads, factors, noise, damping, precond_lr)

TINY = torch.finfo(torch.float32).tiny
# (B, block shape, diagonal per axis): 2-D blocks with triangular, diagonal (Kron's vocab axis) or mixed factors,
# 1-D blocks (a triangular one takes the O(b²) kernels), 3-D blocks (a middle axis exercises the general path; one
# longer than the rest of its block is preconditioned as Qᵀ·(Q·X)), a single block.
LAYOUTS = [
    (3, (16, 12), (False, False)),
    (2, (20, 9), (True, False)),
    (2, (7, 11), (False, True)),
    (4, (13,), (True,)),
    (2, (10,), (False,)),
    (2, (4, 5, 6), (False, True, False)),
    (2, (3, 4, 5), (False, False, False)),
    (2, (3, 9, 2), (False, False, False)),
    (1, (8, 8), (True, True)),
]
# 1-D blocks with a triangular factor, (B, b): sizes that are not multiples of a warp or of the CUDA team (128
# threads), some above it (a thread owns several columns), up to a few hundred blocks, and the largest block these
# kernels take (kron_vector::kMaxBlock = 2048, whose 5·b floats of scratch fill most of a CUDA block's 48 KB).
VECTOR_BLOCKS = [(1, 1), (5, 1), (3, 7), (300, 33), (4, 130), (2, 257), (1, 2048)]


def make_factors(batch, block, diagonal, gen):
    """Well-conditioned factors: I + 0.1·(strictly upper noise) + a positive diagonal, or a positive vector."""
    factors = []
    for b, diag in zip(block, diagonal):
        d = 0.5 + torch.rand(batch, b, generator=gen, dtype=torch.float64)
        if diag:
            factors.append(d)
        else:
            noise = 0.3 * torch.randn(batch, b, b, generator=gen, dtype=torch.float64) / math.sqrt(b)
            factors.append(torch.triu(noise, 1) + torch.diag_embed(d))
    return factors


def f32(t, device):
    return t.to(device=device, dtype=torch.float32).contiguous()


def apply_along(x, axis, mat):
    """out[.., i, ..] = Σ_j mat[i, j]·x[.., j, ..] along `axis` of one block."""
    moved = x.movedim(axis, 0)
    return (mat @ moved.reshape(moved.shape[0], -1)).reshape(moved.shape).movedim(0, axis)


def scale_along(x, axis, vec):
    shape = [1] * x.ndim
    shape[axis] = -1
    return x * vec.reshape(shape)


def unfold(x, axis):
    moved = x.movedim(axis, 0)
    return moved.reshape(moved.shape[0], -1)


def norm_lower_bound(a):
    """Levanter's lower bound of the spectral norm of a symmetric matrix, for one matrix."""
    max_abs = a.abs().max()
    if max_abs == 0:
        return max_abs
    s = a / max_abs
    x = s[:, (s * s).sum(0).argmax()]
    y = x @ s
    y = y / y.norm()
    return max_abs * (y @ s.T).norm()


def precondition_reference(g, factors, diagonal):
    out = []
    for k in range(g.shape[0]):
        x = g[k]
        for axis, (q, diag) in enumerate(zip(factors, diagonal)):
            x = scale_along(x, axis, q[k] ** 2) if diag else apply_along(x, axis, q[k].T @ q[k])
        out.append(x)
    return torch.stack(out)


def update_reference(g, factors, diagonal, noise, damping, precond_lr):
    new = [q.clone() for q in factors]
    for k in range(g.shape[0]):
        a = g[k] + damping[k] * noise[k]
        conj = noise[k]
        for axis, (q, diag) in enumerate(zip(factors, diagonal)):
            if diag:
                a, conj = scale_along(a, axis, q[k]), scale_along(conj, axis, 1 / q[k])
            else:
                a, conj = apply_along(a, axis, q[k]), apply_along(conj, axis, torch.linalg.inv(q[k]).T)
        for axis, (q, diag) in enumerate(zip(factors, diagonal)):
            term1, term2 = unfold(a, axis) @ unfold(a, axis).T, unfold(conj, axis) @ unfold(conj, axis).T
            if diag:
                term1, term2 = torch.diagonal(term1), torch.diagonal(term2)
                step = precond_lr / ((term1 + term2).abs().max() + TINY)
                new[axis][k] = q[k] - step * (term1 - term2) * q[k]
            else:
                step = precond_lr / (norm_lower_bound(term1 + term2) + TINY)
                new[axis][k] = q[k] - step * torch.triu(term1 - term2) @ q[k]
    return new


def random_inputs(layout, gen):
    batch, block, diagonal = layout
    g = torch.randn(batch, *block, generator=gen, dtype=torch.float64)
    return g, make_factors(batch, block, diagonal, gen)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_precondition_matches_float64_reference(device, rng, layout):
    g, factors = random_inputs(layout, rng)
    expected = precondition_reference(g, factors, layout[2])
    out = kron_precondition(f32(g, device), [f32(q, device) for q in factors])
    assert out.shape == g.shape and out.is_contiguous()
    torch.testing.assert_close(out.double().cpu(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_update_preconditioner_matches_float64_reference(device, rng, layout):
    g, factors = random_inputs(layout, rng)
    noise = torch.randn(g.shape, generator=rng, dtype=torch.float64)
    damping = 1e-3 * torch.rand(g.shape[0], generator=rng, dtype=torch.float64)
    precond_lr = 0.2
    expected = update_reference(g, factors, layout[2], noise, damping, precond_lr)
    out = [f32(q, device) for q in factors]
    grads = f32(g, device)
    before = grads.clone()
    kron_update_preconditioner_(grads, out, f32(noise, device), f32(damping, device), precond_lr=precond_lr)
    assert torch.equal(grads, before)
    for q, e, diag in zip(out, expected, layout[2]):
        torch.testing.assert_close(q.double().cpu(), e, atol=2e-5, rtol=2e-4)
        if not diag:
            assert torch.equal(q.cpu(), torch.triu(q.cpu())), "a triangular factor must stay upper triangular"


def vector_inputs(batch, b, gen):
    g, factors = random_inputs((batch, (b,), (False,)), gen)
    noise = torch.randn(g.shape, generator=gen, dtype=torch.float64)
    damping = 1e-3 * torch.rand(batch, generator=gen, dtype=torch.float64)
    return g, factors, noise, damping


@pytest.mark.parametrize("batch, b", VECTOR_BLOCKS)
def test_vector_blocks_match_float64_reference(device, rng, batch, b):
    g, factors, noise, damping = vector_inputs(batch, b, rng)
    expected_direction = precondition_reference(g, factors, (False,))
    expected_factor = update_reference(g, factors, (False,), noise, damping, 0.2)[0]
    grads, q = f32(g, device), f32(factors[0], device)
    out = kron_precondition(grads, [q])
    torch.testing.assert_close(out.double().cpu(), expected_direction, atol=2e-6, rtol=1e-5)
    kron_update_preconditioner_(grads, [q], f32(noise, device), f32(damping, device), precond_lr=0.2)
    torch.testing.assert_close(q.double().cpu(), expected_factor, atol=1e-6, rtol=1e-5)
    assert torch.equal(q.cpu(), torch.triu(q.cpu())), "a triangular factor must stay upper triangular"


@pytest.mark.parametrize("batch, b", VECTOR_BLOCKS)
def test_vector_blocks_agree_with_the_pure_core(device, rng, batch, b):
    """The O(b²) kernels against the generic formulation (Gram terms, norm bound of the full matrix, triu(·)·Q) on the
    same float32 inputs, over several updates so that the factors drift from their start."""
    from fastoptim.optim.functional import kron as pure

    g, factors, noise, damping = vector_inputs(batch, b, rng)
    g, q, noise, damping = (f32(t, device) for t in (g, factors[0], noise, damping))
    q_native, q_pure = q.clone(), q.clone()
    for _ in range(3):
        kron_update_preconditioner_(g, [q_native], noise, damping, precond_lr=0.2)
        pure.kron_update_preconditioner_(g, [q_pure], (False,), noise, damping, precond_lr=0.2, fused=False)
        torch.testing.assert_close(q_native, q_pure, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(kron_precondition(g, [q_native]),
                               pure.kron_precondition(g, [q_pure], (False,), fused=False), atol=2e-6, rtol=1e-5)


def test_vector_blocks_with_zero_input_leave_their_factor(device, rng):
    """A zero momentum and noise block has zero Gram terms (bound 0, step precond_lr/tiny) and keeps its factor
    exactly, as the generic path does; the other blocks of the batch are updated as usual."""
    g, factors, noise, damping = vector_inputs(6, 9, rng)
    zero = torch.tensor([True, False, True, False, False, True])
    g[zero], noise[zero] = 0.0, 0.0
    expected = update_reference(g, factors, (False,), noise, damping, 0.2)[0]
    q = f32(factors[0], device)
    before = q.clone()
    kron_update_preconditioner_(f32(g, device), [q], f32(noise, device), f32(damping, device), precond_lr=0.2)
    assert torch.equal(q[zero.to(device)], before[zero.to(device)])
    assert not torch.equal(q[~zero.to(device)], before[~zero.to(device)])
    torch.testing.assert_close(q.double().cpu(), expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(kron_precondition(f32(g, device), [q])[zero.to(device)], torch.zeros(3, 9, device=device))


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the team check")
def test_vector_bodies_need_no_more_than_their_barriers_on_a_many_worker_team(tmp_path, rng):
    """The CUDA kernels run the bodies above on 128 threads, which this machine cannot: a C++ harness runs them on
    threads with the CUDA team's ownership rule under ThreadSanitizer (a cross-worker read without a barrier fails)
    and checks that 2, 3 and 32 workers compute what one does."""
    from torch.utils.cpp_extension import include_paths

    source = pathlib.Path(__file__).with_name("kron_vector_team_check.cpp")
    binary = tmp_path / "kron_vector_team_check"
    csrc = pathlib.Path(__file__).parents[1] / "csrc"
    build = subprocess.run(["g++", "-std=c++20", "-O1", "-g", "-fsanitize=thread", "-pthread", f"-I{csrc}",
                            *(f"-I{p}" for p in include_paths()), str(source), "-o", str(binary)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    seed = int(torch.randint(2**31, (), generator=rng))
    check = subprocess.run([str(binary), str(seed)], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and "ThreadSanitizer" not in check.stderr, check.stdout + check.stderr


def test_update_with_zero_gradient_and_noise_is_finite_and_leaves_factors(device):
    g = torch.zeros(2, 4, 3, device=device)
    factors = [torch.eye(4, device=device).expand(2, 4, 4).contiguous(), torch.ones(2, 3, device=device)]
    kron_update_preconditioner_(g, factors, torch.zeros_like(g), torch.zeros(2, device=device), precond_lr=0.1)
    assert torch.equal(factors[0].cpu(), torch.eye(4).expand(2, 4, 4)) and torch.equal(factors[1].cpu(), torch.ones(2, 3))


@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[1], LAYOUTS[3], LAYOUTS[5]])
def test_balance_matches_float64_reference(device, rng, layout):
    _, factors = random_inputs(layout, rng)
    factors = [q * (1 + 5 * torch.rand(q.shape[0], *[1] * (q.ndim - 1), generator=rng, dtype=torch.float64))
               for q in factors]
    norms = torch.stack([q.abs().reshape(q.shape[0], -1).max(-1).values for q in factors])
    target = norms.prod(0) ** (1 / len(factors))  # geometric mean per block
    expected = [q * (target / n).reshape(-1, *[1] * (q.ndim - 1)) for q, n in zip(factors, norms)]
    out = [f32(q, device) for q in factors]
    kron_balance_(out)
    for q, e in zip(out, expected):
        torch.testing.assert_close(q.double().cpu(), e, atol=1e-5, rtol=1e-5)


# ---- bad input, opcheck, FakeTensor --------------------------------------------------------------------------------
def update_args(device="cpu"):
    g = torch.randn(2, 4, 3, device=device)
    return [g, [torch.eye(4, device=device).expand(2, 4, 4).contiguous(), torch.ones(2, 3, device=device)],
            torch.randn(2, 4, 3, device=device), torch.full((2,), 1e-3, device=device), 0.1]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.__setitem__(0, a[0].double()), "grads has dtype torch.float64; it must be float32"),
        (lambda a: a.__setitem__(1, a[1][:1]), r"factors has 1 tensors but grads \[2, 4, 3\] has 2 block axes"),
        (lambda a: a[1].__setitem__(1, torch.ones(2, 4)), r"factors\[1\] has shape \[2, 4\] but the blocks need \[2, 3\]"),
        (lambda a: a[1].__setitem__(0, torch.ones(2, 4, 4, 1)), r"factors\[0\] must be \(B, b\) \(diagonal\) or"),
        (lambda a: a.__setitem__(2, a[2].mT.contiguous().mT), "noise is not contiguous"),
        (lambda a: a.__setitem__(3, torch.ones(3)), r"damping has shape \[3\] but the blocks need \[2\]"),
    ],
)
def test_update_bad_input_names_the_argument_and_writes_nothing(mutate, message):
    args = update_args()
    mutate(args)
    before = [q.clone() for q in args[1]]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastoptim.kron_update_preconditioner_(*args)
    for q, b in zip(args[1], before):
        assert torch.equal(q, b)


def test_balance_rejects_mismatched_batches():
    with pytest.raises(RuntimeError, match=r"factors\[1\] has shape \[3, 4\]; expected \(2, b\) or \(2, b, b\)"):
        kron_balance_([torch.ones(2, 5), torch.ones(3, 4)])


@pytest.mark.parametrize("layout", [(2, (5, 4), (False, True)), (3, (7,), (False,))])
def test_opcheck(device, rng, layout):
    g, factors = random_inputs(layout, rng)
    g, factors = f32(g, device), [f32(q, device) for q in factors]
    fo = torch.ops.fastoptim
    torch.library.opcheck(fo.kron_precondition.default, (g, factors))
    torch.library.opcheck(fo.kron_update_preconditioner_.default,
                          (g, [q.clone() for q in factors], torch.randn_like(g),
                           torch.full((g.shape[0],), 1e-3, device=device), 0.1))
    torch.library.opcheck(fo.kron_balance_.default, ([q.clone() for q in factors],))


def test_fake_tensor_shapes():
    with FakeTensorMode():
        g = torch.empty(3, 6, 2)
        out = torch.ops.fastoptim.kron_precondition(g, [torch.empty(3, 6, 6), torch.empty(3, 2)])
        assert out.shape == (3, 6, 2)
        torch.ops.fastoptim.kron_update_preconditioner_(g, [torch.empty(3, 6, 6), torch.empty(3, 2)],
                                                        torch.empty(3, 6, 2), torch.empty(3), 0.1)
        torch.ops.fastoptim.kron_balance_([torch.empty(3, 6, 6), torch.empty(3, 2)])


# ---- the Kron optimizer on these ops (fused) agrees with its pure-torch path over several steps ---------------------
def test_kron_fused_matches_pure_over_steps(rng):
    from fastoptim import Kron

    # dims not multiples of the block size 4, a 1-D parameter (diagonal), a dim > max_size_triangular (diagonal)
    shapes = [(10, 6), (7,), (5, 20), (4, 4)]
    init = [torch.randn(s, generator=rng) for s in shapes]
    grads = [[torch.randn(s, generator=rng) for s in shapes] for _ in range(8)]
    hp = dict(lr=0.01, betas=(0.9, 0.0), weight_decay=0.1, block_size=4, normalize_grads=True, precond_lr=0.2,
              precond_update_prob_min=0.5, precond_update_flat_start=3, max_size_triangular=12, merge_dims_target=0)
    runs = {}
    for fused in (True, False):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = Kron(params, fused=fused, seed=3, **hp)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        runs[fused] = (params, opt)
    for p_fused, p_pure in zip(runs[True][0], runs[False][0]):
        torch.testing.assert_close(p_fused.detach(), p_pure.detach(), rtol=1e-4, atol=1e-5)
        for key, value in runs[True][1].state[p_fused].items():
            torch.testing.assert_close(value, runs[False][1].state[p_pure][key], rtol=1e-4, atol=1e-5)
