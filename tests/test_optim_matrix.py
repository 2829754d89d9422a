"""Muon, Scion, Soap and Kron against the float64 references of reference_matrix.py (benchmark-spec §1.7–§1.10)."""

import copy
import functools
import io
import math

import pytest
import torch
from torch import nn

import fastoptim
from fastoptim.optim.base import RowShard
from fastoptim.optim.functional.newton_schulz import newton_schulz
from fastoptim.optim.kron import kron_noise_seed
from reference_matrix import adamw_step, clip_, muon_matrix_step, ns_reference, signum_step

# ---------------------------------------------------------------- shared helpers


# Tiny tensors: intra-op threads only add contention on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def random_params(shapes, gen, device="cpu"):
    return [torch.randn(s, generator=gen).to(device).requires_grad_() for s in shapes]


def random_grads(params, gen, scale=1.0):
    return [scale * torch.randn(p.shape, generator=gen) for p in params]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.to(p.device, copy=True)


def assert_close(actual, expected, rtol, atol):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol)


class Attention(nn.Module):
    def __init__(self, d, n_heads):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d // n_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, d, n_heads, hidden):
        super().__init__()
        self.attn_norm, self.attn = nn.RMSNorm(d), Attention(d, n_heads)
        self.mlp_norm, self.mlp = nn.RMSNorm(d), MLP(d, hidden)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyLlama(nn.Module):
    """A tiny Llama with the module names of TEAM.md (the routing relies on them)."""

    def __init__(self, vocab=64, d=32, n_heads=4, hidden=64, n_layers=2):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, n_heads, hidden) for _ in range(n_layers))
        self.norm, self.lm_head = nn.RMSNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def train_tiny(make_optimizer, steps=40, seed=0):
    torch.manual_seed(seed)
    model = TinyLlama()
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(seed))
    opt = make_optimizer(model)
    losses = []
    for _ in range(steps):
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 64), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def run_and_resume(make, params_of, steps, gen):
    """Run 2·steps in one go, and steps + state_dict round trip + steps; return both final parameter lists."""
    grads = [random_grads(params_of[0], gen) for _ in range(2 * steps)]
    straight = [p.detach().clone().requires_grad_() for p in params_of[0]]
    opt = make(straight)
    for g in grads:
        set_grads(straight, g)
        opt.step()
    first = [p.detach().clone().requires_grad_() for p in params_of[0]]
    opt = make(first)
    for g in grads[:steps]:
        set_grads(first, g)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    resumed = [p.detach().clone().requires_grad_() for p in first]
    opt2 = make(resumed)
    opt2.load_state_dict(saved)
    for g in grads[steps:]:
        set_grads(resumed, g)
        opt2.step()
    return straight, resumed


# ---------------------------------------------------------------- Newton–Schulz

NS_SHAPES = [(1, 16, 16), (3, 24, 8), (2, 8, 24), (5, 7, 13), (1, 40, 40)]


@pytest.mark.parametrize("shape", NS_SHAPES)
@pytest.mark.parametrize("steps", [5, 10])
def test_newton_schulz_matches_float64_reference(shape, steps, rng):
    # Singular values kept away from 0: there the iteration's slope (3.4445 per step) amplifies float32 rounding
    # beyond any fixed tolerance, for the library and any other float32 implementation alike.
    n, m, k = shape
    u, _ = torch.linalg.qr(torch.randn(n, m, min(m, k), generator=rng))
    v, _ = torch.linalg.qr(torch.randn(n, k, min(m, k), generator=rng))
    s = 0.05 + torch.rand(n, min(m, k), generator=rng)
    x = (u * s[:, None, :]) @ v.mT * 3.0
    out = newton_schulz(x, steps, 1e-7)
    expected = torch.stack([ns_reference(m, steps, 1e-7) for m in x])
    assert out.shape == x.shape and out.dtype == torch.float32
    assert_close(out, expected, rtol=1e-4, atol=2e-5)


def _quintic_band():
    """Where the scalar quintic leaves singular values: iterate it from a fine grid of (0, 1] to its attractor."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = torch.linspace(1e-3, 1, 10_000, dtype=torch.float64)
    for _ in range(60):
        x = a * x + b * x**3 + c * x**5
    return x.min().item(), x.max().item()


def test_newton_schulz_singular_values_reach_the_quintic_band(rng):
    lo, hi = _quintic_band()
    assert 0.6 < lo < 0.7 and 1.1 < hi < 1.2  # the known ~[0.68, 1.13]
    # Singular values grow about a-fold per step until they join the band, so how many steps a matrix needs depends on
    # its conditioning (a square Gaussian one can have σ_min/‖X‖_F ~ 1e-5): inputs get singular values in [0.05, 1].
    for steps, shapes in ((10, [(4, 64, 64), (2, 20, 50)]), (5, [(3, 32, 128), (3, 128, 32)])):
        for shape in shapes:
            batch, m, n = shape
            left = torch.linalg.qr(torch.randn(batch, m, min(m, n), generator=rng)).Q
            right = torch.linalg.qr(torch.randn(batch, n, min(m, n), generator=rng)).Q
            sigma = 0.05 + 0.95 * torch.rand(batch, min(m, n), generator=rng)
            x = left @ torch.diag_embed(sigma) @ right.mT
            singular = torch.linalg.svdvals(newton_schulz(x, steps, 1e-7).double())
            assert singular.min() >= lo - 1e-3 and singular.max() <= hi + 1e-3, (steps, shape)


def test_newton_schulz_zero_input_is_finite_zero():
    out = newton_schulz(torch.zeros(2, 6, 9), 5, 1e-7)
    assert torch.equal(out, torch.zeros(2, 6, 9))


def test_newton_schulz_rejects_non_batched_input():
    with pytest.raises(ValueError, match="x: expected a batch"):
        newton_schulz(torch.randn(4, 4), 5, 1e-7)


# ---------------------------------------------------------------- Muon and Scion

# group 1: tall, wide, and two squares (one batched Newton–Schulz call); group 2: >2-D and another square
MATRIX_SHAPES = [(24, 8), (8, 24), (16, 16), (16, 16), (8, 4, 3), (16, 16)]
VECTOR_SHAPES = [(16,), (24,)]


def _split_setup(gen, device):
    params = random_params(MATRIX_SHAPES + VECTOR_SHAPES, gen, device)
    matrices, others, vectors = params[:4], params[4:6], params[6:]
    return params, matrices, others, vectors


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("scale, adjust_lr_fn", [("spectral", None), ("moonlight", "match_rms_adamw")])
def test_muon_matches_reference(nesterov, scale, adjust_lr_fn, rng, device):
    params, matrices, others, vectors = _split_setup(rng, device)
    groups = [
        {"params": matrices},  # routed to the muon branch (≥ 2 dims)
        {"params": others, "lr": 0.01, "momentum": 0.8, "ns_steps": 10},
        {"params": vectors, "weight_decay": 0.0},  # routed to the adamw branch (1-D)
    ]
    hp = dict(lr=0.02, momentum=0.95, nesterov=nesterov, ns_steps=5, eps=1e-7, adam_betas=(0.8, 0.98), adam_eps=1e-8,
              weight_decay=0.1, max_grad_norm=0.5, adam_lr_ratio=0.3, adjust_lr_fn=adjust_lr_fn,
              ns_dtype=torch.float32)
    opt = fastoptim.Muon(groups, **hp)
    assert [g["branch"] for g in opt.param_groups] == ["muon", "muon", "adamw"]

    ref = [p.detach().double().cpu() for p in params]
    states = [{} for _ in params]
    for _ in range(4):
        grads = random_grads(params, rng)
        set_grads(params, grads)
        opt.step()
        for i in range(6):
            g_hp = dict(lr=0.02, momentum=0.95, ns_steps=5) if i < 4 else dict(lr=0.01, momentum=0.8, ns_steps=10)
            muon_matrix_step(ref[i], grads[i], states[i], nesterov=nesterov, eps=1e-7, weight_decay=0.1, scale=scale,
                             **g_hp)
        for i, g in zip((6, 7), clip_(grads[6:], 0.5)):
            adamw_step(ref[i], g, states[i], lr=0.02 * 0.3, betas=(0.8, 0.98), eps=1e-8, weight_decay=0.0)
    for p, r in zip(params, ref):
        assert_close(p.detach(), r, rtol=1e-5, atol=1e-5)


def test_scion_matches_reference(rng, device):
    params, matrices, others, vectors = _split_setup(rng, device)
    groups = [{"params": matrices}, {"params": others, "lr": 0.005, "ns_steps": 5}, {"params": vectors}]
    opt = fastoptim.Scion(groups, lr=0.02, momentum=0.9, ns_steps=10, scion_eps=1e-7, betas=(0.9, 0.98),
                          weight_decay=0.1, max_grad_norm=0.5, signum_lr_ratio=0.1, ns_dtype=torch.float32)
    assert [g["branch"] for g in opt.param_groups] == ["scion", "scion", "signum"]
    ref = [p.detach().double().cpu() for p in params]
    states = [{} for _ in params]
    for _ in range(4):
        grads = random_grads(params, rng)
        set_grads(params, grads)
        opt.step()
        for i in range(6):
            lr, steps = (0.02, 10) if i < 4 else (0.005, 5)
            muon_matrix_step(ref[i], grads[i], states[i], lr=lr, momentum=0.9, nesterov=False, ns_steps=steps,
                             eps=1e-7, weight_decay=0.1, ema=True)
        for i, g in zip((6, 7), clip_(grads[6:], 0.5)):
            signum_step(ref[i], g, states[i], lr=0.002, beta=0.9, weight_decay=0.1)
    for p, r in zip(params, ref):
        assert_close(p.detach(), r, rtol=1e-5, atol=1e-5)


def float32_torch_iteration(grad, ns_coefficients, ns_steps, eps):
    """torch.optim.Muon's Newton–Schulz (torch/optim/_muon.py) in float32 instead of bfloat16."""
    a, b, c = ns_coefficients
    x = grad.float().T if grad.size(0) > grad.size(1) else grad.float()
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if grad.size(0) > grad.size(1) else x


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
def test_muon_agrees_with_torch_muon(nesterov, adjust_lr_fn, rng, monkeypatch):
    """The same constructor arguments as torch.optim.Muon give its result: its momentum (an EMA buffer; ours is
    undampened, the same direction up to a factor (1−β) that the normalisation removes), Nesterov, lr adjustment and
    decay. Both iterate in float32 (torch's bf16 cast patched out): in bf16, Newton–Schulz multiplies the rounding
    noise along small singular values by about 3.4 per iteration, so two bf16 runs differ elementwise by several
    percent of the step however their code agrees, which would measure bf16 and not the semantics."""
    monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", float32_torch_iteration)
    shapes = [(32, 16), (16, 48), (24, 24)]
    ours = random_params(shapes, rng)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = fastoptim.Muon(ours, lr=0.02, momentum=0.9, nesterov=nesterov, weight_decay=0.1,
                         adjust_lr_fn=adjust_lr_fn, eps=1e-7, ns_dtype=torch.float32)
    peer = torch.optim.Muon(theirs, lr=0.02, momentum=0.9, nesterov=nesterov, weight_decay=0.1,
                            adjust_lr_fn=adjust_lr_fn, eps=1e-7)
    start = [p.detach().clone() for p in ours]
    for _ in range(3):
        grads = random_grads(ours, rng)
        set_grads(ours, grads)
        set_grads(theirs, grads)
        opt.step()
        peer.step()
    for p, q, s in zip(ours, theirs, start):
        moved = (q.detach() - s).abs().max().item()
        torch.testing.assert_close(p.detach() - s, q.detach() - s, rtol=0, atol=1e-3 * moved)


def test_split_routes_a_llama_model_as_the_spec_says():
    model = TinyLlama(n_layers=1)
    for cls, matrix, elementwise in ((fastoptim.Muon, "muon", "adamw"), (fastoptim.Scion, "scion", "signum")):
        opt = cls(model)
        where = {name: (g["branch"], g["weight_decay_mask"]) for g in opt.param_groups for name in g["names"]}
        hidden = [f"layers.0.attn.{n}_proj.weight" for n in "qkvo"] + [
            f"layers.0.mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
        for name in hidden:
            assert where[name] == (matrix, True)
        assert where["embed_tokens.weight"] == (elementwise, False)
        assert where["lm_head.weight"] == (elementwise, True)  # the head is decayed (spec: default mask)
        for name in ("layers.0.attn_norm.weight", "layers.0.mlp_norm.weight", "norm.weight"):
            assert where[name] == (elementwise, False)
        assert len(where) == len(list(model.parameters()))


@pytest.mark.parametrize("make", [
    lambda m: fastoptim.Muon(m, lr=0.02, adam_lr_ratio=0.2, weight_decay=0.0),
    lambda m: fastoptim.Scion(m, lr=0.02, signum_lr_ratio=0.1, weight_decay=0.0),
], ids=["muon", "scion"])
def test_tiny_llama_loss_falls(make):
    losses = train_tiny(make)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.parametrize("make", [
    lambda ps: fastoptim.Muon([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.01}], max_grad_norm=0.5),
    lambda ps: fastoptim.Scion([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.01}], max_grad_norm=0.5),
], ids=["muon", "scion"])
def test_state_dict_round_trip_continues_identically(make, rng):
    params = random_params([(12, 8), (8, 4, 2), (12,), (5,)], rng)
    straight, resumed = run_and_resume(make, [params], steps=3, gen=rng)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_zero_gradient_gives_finite_zero_update(rng):
    params = random_params([(8, 6), (6,)], rng)
    before = [p.detach().clone() for p in params]
    for cls in (fastoptim.Muon, fastoptim.Scion):
        opt = cls(params, weight_decay=0.0)
        set_grads(params, [torch.zeros_like(p) for p in params])
        opt.step()
        for p, b in zip(params, before):
            assert torch.isfinite(p).all() and torch.equal(p.detach(), b)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"), (dict(momentum=1.0), "momentum"),
    (dict(adam_betas=(1.0, 0.9)), "adam_betas"), (dict(ns_steps=-1), "ns_steps"),
    (dict(adjust_lr_fn="kimi"), "adjust_lr_fn"), (dict(eps=-1e-7), "eps"), (dict(max_grad_norm=-1.0), "max_grad_norm"),
    (dict(ns_coefficients=(1.0, 2.0)), "ns_coefficients"), (dict(ns_dtype=torch.float64), "ns_dtype"),
])
def test_muon_rejects_bad_hyperparameters(kwargs, match, rng):
    with pytest.raises(ValueError, match=match):
        fastoptim.Muon(random_params([(4, 4)], rng), **kwargs)


def test_unknown_option_is_named(rng):
    with pytest.raises(ValueError, match="signum_lr_ratio"):
        fastoptim.Muon([{"params": random_params([(4, 4)], rng), "signum_lr_ratio": 0.1}])
    with pytest.raises(ValueError, match="nesterov"):
        fastoptim.build_optimizer("scion", TinyLlama(n_layers=1), {"nesterov": True})


def _assert_untouched_on_error(opt, params, match):
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(opt.state_dict()["state"])
    with pytest.raises(ValueError, match=match):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    after = opt.state_dict()["state"]
    assert state_before.keys() == after.keys()
    for k in after:
        for key, value in after[k].items():
            assert torch.equal(value, state_before[k][key])


ALL = [fastoptim.Muon, fastoptim.Scion, fastoptim.Soap, fastoptim.Kron]


@pytest.mark.parametrize("cls", ALL)
def test_bad_gradients_leave_parameters_and_state_untouched(cls, rng):
    params = random_params([(6, 4), (6,)], rng)
    opt = cls(params)
    set_grads(params, [torch.randn(p.shape) for p in params])
    opt.step()
    params[0].grad = torch.randn(6, 4).to_sparse()
    params[1].grad = torch.randn(6)
    _assert_untouched_on_error(opt, params, "sparse")
    params[0].grad = torch.randn(6, 4)
    opt.state[params[1]][next(iter(opt.state[params[1]].keys() - {"step"}))] = torch.zeros(6, dtype=torch.float64)
    _assert_untouched_on_error(opt, params, "state")


@pytest.mark.parametrize("cls", ALL)
def test_complex_parameters_are_rejected(cls):
    params = [torch.randn(4, 4, dtype=torch.complex64, requires_grad=True), torch.randn(3, requires_grad=True)]
    opt = cls(params)
    set_grads(params, [torch.randn_like(p) for p in params])
    _assert_untouched_on_error(opt, params, "complex")


def test_vector_forced_into_the_matrix_branch_is_an_error(rng):
    params = random_params([(6,)], rng)
    opt = fastoptim.Muon([{"params": params, "branch": "muon"}])
    params[0].grad = torch.randn(6)
    _assert_untouched_on_error(opt, params, "needs ≥ 2 dims")


# ---------------------------------------------------------------- Soap

def structured_grads(shape, steps, gen):
    """Rank-1 gradients G_t = h_t·(u_1 ⊗ u_2 ⊗ …) with fixed u_i. Soap's eigenbasis is only defined up to a
    rotation within the null space of the first step's statistics, which every padded or non-square block has;
    these gradients never enter it, so the result does not depend on that arbitrary choice (random full-rank
    gradients would, in Levanter as here), and the one signal eigenvalue per axis is well separated from the rest.
    The full-rank case is covered on full square blocks."""
    def bounded(*size):  # entries of magnitude in [0.5, 1.5]: no block's statistics nearly vanish
        return (0.5 + torch.rand(size, generator=gen)) * torch.randint(0, 2, size, generator=gen).mul(2).sub(1)

    factors = [bounded(d, 1) for d in shape]
    out = []
    for _ in range(steps):
        g = bounded(*[u.shape[1] for u in factors])
        for axis, u in enumerate(factors):
            g = torch.tensordot(u, g, dims=([1], [axis])).movedim(0, axis)
        out.append(g)
    return out


def full_rank_grads(shapes, refs, steps, ref_hp, gen, floor=1e-3):
    """Random full-rank gradients, each step redrawn until no component of any block in the reference's eigenbasis
    is below `floor` times that block's rms. Adam's first step on a component is its sign whatever its size, so a
    component near zero (1.3e-6 of its block's rms for one CI seed) takes its sign from float32 rounding of the
    rotation, and the comparison measures rounding, not the kernel. The basis does not depend on the parameters, so
    a float64 reference run on zero parameters tracks it."""
    from reference_matrix import soap_rotated_grad, soap_step
    probe = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    states = [{} for _ in shapes]
    out = []
    for _ in range(steps):
        for _attempt in range(100):
            grads = [torch.randn(s, generator=gen) for s in shapes]
            clipped = clip_(grads, SOAP_HP["max_grad_norm"])
            rotated = [b for g, st, r in zip(clipped, states, refs)
                       for b in soap_rotated_grad(g, st, merged=r["merged"], block_shape=r["block_shape"])]
            if all(b.abs().min() >= floor * b.square().mean().sqrt() for b in rotated):
                break
        else:
            raise AssertionError("no well-conditioned gradient in 100 draws: the floor is too high for these shapes")
        for p, g, st, r in zip(probe, clipped, states, refs):
            soap_step(p, g, st, **r, **ref_hp)
        out.append(grads)
    return out


def run_soap(shapes, grads_per_step, refs, hp, ref_hp, gen, device):
    from reference_matrix import soap_step
    params = random_params(shapes, gen, device)
    opt = fastoptim.Soap(params, **hp)
    ref = [p.detach().double().cpu() for p in params]
    states = [{} for _ in params]
    for grads in grads_per_step:
        set_grads(params, grads)
        opt.step()
        for p, g, st, r in zip(ref, clip_(grads, hp["max_grad_norm"]), states, refs):
            soap_step(p, g, st, **r, **ref_hp)
    return params, ref


SOAP_HP = dict(lr=0.01, betas=(0.9, 0.95), shampoo_beta=0.9, weight_decay=0.1, precondition_frequency=3,
               block_size=4, max_precond_dim=16, max_grad_norm=2.0)
SOAP_REF_HP = dict(lr=0.01, betas=(0.9, 0.95), shampoo_beta=0.9, weight_decay=0.1, freq=3)


def test_soap_matches_reference_on_full_blocks(rng, device):
    # square, tall and wide matrices cut into full 4×4 blocks, a 3-D tensor, and a dim ≥ max_precond_dim
    shapes = [(8, 8), (8, 4), (4, 12), (4, 2, 2), (4, 20)]
    refs = [dict(merged=(8, 8), block_shape=(4, 4), rotate=(True, True)),
            dict(merged=(8, 4), block_shape=(4, 4), rotate=(True, True)),
            dict(merged=(4, 12), block_shape=(4, 4), rotate=(True, True)),
            dict(merged=(4, 2, 2), block_shape=(4, 2, 2), rotate=(True, True, True)),
            dict(merged=(4, 20), block_shape=(4, 20), rotate=(True, False))]
    steps = full_rank_grads(shapes, refs, 7, dict(SOAP_REF_HP, eps=1e-8), rng)
    params, ref = run_soap(shapes, steps, refs, dict(SOAP_HP, eps=1e-8, merge_dims_target=0),
                           dict(SOAP_REF_HP, eps=1e-8), rng, device)
    for p, r in zip(params, ref):
        assert_close(p.detach(), r, rtol=1e-4, atol=1e-5)


def test_soap_matches_reference_on_padded_and_merged_blocks(rng, device):
    from fastoptim.optim.functional.blocks import merge_groups
    assert merge_groups((2, 3, 4), 6) == [[0, 1], [2]]  # costs: (6, 4) 0.58 < (2, 3, 4) 3.17 < (2, 12) < (24)
    shapes = [(6, 10), (6,), (3,), (2, 3, 4)]  # dims not multiples of 4; 1-D; merged to (6, 4)
    refs = [dict(merged=(6, 10), block_shape=(4, 4), rotate=(True, True)),
            dict(merged=(6,), block_shape=(4,), rotate=(True,)),
            dict(merged=(3,), block_shape=(3,), rotate=(True,)),
            dict(merged=(6, 4), block_shape=(4, 4), rotate=(True, True))]
    per_param = [[g.reshape(s) for g in structured_grads(r["merged"], 7, rng)]  # in the merged shape, where the
                 for s, r in zip(shapes, refs)]                                  # statistics live
    steps = [list(gs) for gs in zip(*per_param)]
    # eps well above float32 rounding of the (empty) null-space components, which it divides
    params, ref = run_soap(shapes, steps, refs, dict(SOAP_HP, eps=1e-3, merge_dims_target=6),
                           dict(SOAP_REF_HP, eps=1e-3), rng, device)
    for p, r in zip(params, ref):
        assert_close(p.detach(), r, rtol=1e-4, atol=2e-5)


def test_soap_first_step_only_initialises(rng):
    params = random_params([(8, 6), (5,)], rng)
    before = [p.detach().clone() for p in params]
    opt = fastoptim.Soap(params, lr=0.1, weight_decay=0.0, block_size=4, merge_dims_target=0)
    set_grads(params, [torch.randn(p.shape) for p in params])
    opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    state = opt.state[params[0]]
    assert torch.count_nonzero(state["exp_avg"]) == 0 and torch.count_nonzero(state["exp_avg_sq"]) == 0
    q = state["Q0"]  # orthonormal eigenbases, eigenvalues descending
    torch.testing.assert_close(q.mT @ q, torch.eye(4).expand_as(q), atol=1e-5, rtol=0)
    eig = torch.diagonal(q.mT @ state["GG0"] @ q, dim1=-2, dim2=-1)
    assert (eig[:, :-1] >= eig[:, 1:] - 1e-6).all()
    # with decay, the first step is w ← w − lr·λ·w only
    opt = fastoptim.Soap(params, lr=0.1, weight_decay=0.5)
    opt.step()
    for p, b in zip(params, before):
        torch.testing.assert_close(p.detach(), b * (1 - 0.05), rtol=1e-6, atol=0)


def test_soap_zero_gradient_gives_finite_zero_update(rng):
    params = random_params([(8, 6), (5,)], rng)
    before = [p.detach().clone() for p in params]
    opt = fastoptim.Soap(params, weight_decay=0.0, block_size=4)
    for _ in range(4):
        set_grads(params, [torch.zeros_like(p) for p in params])
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


def test_soap_state_dict_round_trip_and_groups(rng):
    make = lambda ps: fastoptim.Soap([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.002, "block_size": 3}],
                                     block_size=4, precondition_frequency=2, merge_dims_target=0)
    params = random_params([(8, 6), (6, 8), (7,), (5, 4)], rng)
    straight, resumed = run_and_resume(make, [params], steps=3, gen=rng)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def _saved_and_loaded(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    size = buffer.tell()
    buffer.seek(0)
    return torch.load(buffer), size


def _state_bytes(opt):
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values())


@pytest.mark.parametrize("cls", [fastoptim.Soap, fastoptim.Kron])
def test_block_state_is_kept_batched_and_saves_once(cls, rng):
    """Same-shape blocks of several parameters live in one tensor between steps (no gather or scatter per step); a
    checkpoint stores each byte once and a run resumed from it continues bit for bit."""
    shapes = [(8, 8), (8, 4), (4, 8), (5,)]
    make = lambda ps: cls(ps, block_size=4, merge_dims_target=0, weight_decay=0.1)
    params = random_params(shapes, rng)
    opt = make(params)
    grads = [random_grads(params, rng) for _ in range(5)]
    for g in grads[:2]:
        set_grads(params, g)
        opt.step()
    key = "Q0"
    square = [opt.state[p][key] for p in params[:3]]  # all (n, 4, 4) blocks
    assert len({t.untyped_storage().data_ptr() for t in square}) == 1
    addresses = [t.data_ptr() for t in square]
    set_grads(params, grads[2])
    opt.step()
    assert [opt.state[p][key].data_ptr() for p in params[:3]] == addresses  # updated in place, not rebuilt

    saved, size = _saved_and_loaded(opt.state_dict())
    assert size < 1.1 * _state_bytes(opt) + 64 * 1024
    resumed = [p.detach().clone().requires_grad_() for p in params]
    opt2 = make(resumed)
    opt2.load_state_dict(saved)
    for g in grads[3:]:
        set_grads(params, g)
        opt.step()
        set_grads(resumed, g)
        opt2.step()
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)


def test_soap_batched_state_matches_one_optimizer_per_parameter(rng):
    """Soap acts on each parameter alone (no clip here), so one optimizer over all of them, whose batches change
    members when a parameter has no gradient on a step, must match an optimizer per parameter exactly."""
    shapes = [(8, 8), (8, 4), (4, 8), (6,)]
    hp = dict(block_size=4, merge_dims_target=0, max_grad_norm=0.0, precondition_frequency=2)
    params = random_params(shapes, rng)
    alone = [p.detach().clone().requires_grad_() for p in params]
    together = fastoptim.Soap(params, **hp)
    singles = [fastoptim.Soap([p], **hp) for p in alone]
    for step in range(6):
        grads = random_grads(params, rng)
        skipped = 1 if step in (2, 3) else None
        for i, (p, q, g) in enumerate(zip(params, alone, grads)):
            p.grad = None if i == skipped else g.clone()
            q.grad = None if i == skipped else g.clone()
        together.step()
        for i, single in enumerate(singles):
            if i != skipped:
                single.step()
    for p, q in zip(params, alone):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def hadamard_grads(rows, cols, block, steps, gen):
    """Gradients whose every block's Kronecker statistic has one fixed eigenbasis and well separated eigenvalues,
    whichever way the rows are summed: G_t = P_t·H·D_t·S·O with H orthogonal ±1 columns of a Sylvester Hadamard
    matrix (so HᵀH = rows·I exactly, for every row permutation P_t and column signs D_t drawn afresh each step), S
    fixed scales 1, 1.25, 1.5, … per block and O fixed orthogonal per block. In the eigenbasis every entry has
    magnitude exactly S's, far from zero, so Adam's denominators are well conditioned and the ranks' sums, which
    round differently from one process's, move the result by rounding only."""
    hadamard = torch.ones(1, 1)
    while hadamard.shape[0] < rows:
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)])
    assert hadamard.shape[0] == rows and cols <= rows and cols % block == 0
    scales = (1 + 0.25 * torch.arange(block, dtype=torch.float64)).repeat(cols // block)
    bases = torch.block_diag(*[torch.linalg.qr(torch.randn(block, block, generator=gen, dtype=torch.float64))[0]
                               for _ in range(cols // block)])
    out = []
    for _ in range(steps):
        signs = torch.randint(0, 2, (cols,), generator=gen).mul(2).sub(1).double()
        g = hadamard[torch.randperm(rows, generator=gen), :cols].double() * signs * scales
        out.append((g @ bases).float())
    return out


class RanksInThreads:
    """sum_over_ranks for optimizers stepping in threads, one per rank: each call waits for every rank's tensor and
    leaves their sum, added in rank order, in each; a call that some rank never makes times out (as a hang would)."""

    def __init__(self, world_size):
        import threading
        self.barrier = threading.Barrier(world_size, timeout=60)
        self.parts = [None] * world_size
        self.calls = [0] * world_size

    def sum_for(self, rank):
        return functools.partial(self._reduce, rank, torch.add)

    def max_for(self, rank):
        return functools.partial(self._reduce, rank, torch.maximum)

    def _reduce(self, rank, combine, tensor):
        self.parts[rank] = tensor.clone()
        self.calls[rank] += 1
        self.barrier.wait()
        total = self.parts[0]
        for part in self.parts[1:]:
            total = combine(total, part)
        self.barrier.wait()
        tensor.copy_(total)

    def run(self, steps):
        import concurrent.futures
        with concurrent.futures.ThreadPoolExecutor(len(steps)) as pool:
            for future in [pool.submit(step) for step in steps]:
                future.result()


def step_row_shards_and_whole(cls, hp, whole, grads, spans):
    """Step `whole` (parameters of one shape) in one process, and its rows `spans` as ranks in threads, each with
    its own optimizer told which rows it holds and summing over the others through RanksInThreads, on the same
    gradients (grads[parameter][step]). Returns (the one-process optimizer, per rank its shards, its optimizer,
    the RanksInThreads)."""
    device = whole[0].device
    shards = [[p.detach()[a:b].clone().requires_grad_() for p in whole] for a, b in spans]
    ranks = RanksInThreads(len(spans))
    optimizers = []
    for rank, params in enumerate(shards):
        opt = cls(params, **hp)
        opt.shard_of.update((p, RowShard(whole[0].shape, spans[rank][0])) for p in params)
        opt.sum_over_ranks, opt.max_over_ranks = ranks.sum_for(rank), ranks.max_for(rank)
        optimizers.append(opt)
    one = cls(whole, **hp)
    for step in range(len(grads[0])):
        set_grads(whole, [g[step].to(device) for g in grads])
        for (a, b), params in zip(spans, shards):
            set_grads(params, [g[step][a:b].to(device) for g in grads])
        one.step()
        ranks.run([opt.step for opt in optimizers])
    return one, shards, optimizers, ranks


@pytest.mark.parametrize("fused", [None, False])
def test_soap_row_shards_with_summed_statistics_step_as_the_whole_tensor(fused, rng, device):
    """What a rank of ZeRO-1 or FSDP2 does with a tensor whose vocabulary axis is not rotated: three ranks each step
    their rows (11, 11, 10 of 32) of two such tensors, batched together, with the statistics summed over the ranks;
    after six steps (first step, three refreshes) every rank's rows are the whole tensor's stepped in one process,
    and every rank holds the same factors, bit for bit."""
    rows, cols, block = 32, 16, 8
    hp = dict(lr=0.01, betas=(0.9, 0.95), shampoo_beta=0.9, eps=1e-10, weight_decay=0.1, precondition_frequency=2,
              block_size=block, max_precond_dim=rows, merge_dims_target=0, fused=fused)
    whole = random_params([(rows, cols), (rows, cols)], rng, device)
    grads = [hadamard_grads(rows, cols, block, 6, rng) for _ in whole]
    spans = [(0, 11), (11, 22), (22, 32)]
    one, shards, optimizers, ranks = step_row_shards_and_whole(fastoptim.Soap, hp, whole, grads, spans)
    assert one.row_axes(one.param_groups[0], whole[0]) == {"exp_avg": 1, "exp_avg_sq": 1, "GG1": None, "Q1": None}
    assert ranks.calls == [6] * 3  # one sum per step: the two tensors' statistics are batched
    for (a, b), params in zip(spans, shards):
        for p, q in zip(params, whole):
            # The differently summed statistics round differently: a few float32 ulps of the parameter (the six
            # updates are about 6e-2 per element, so a wrong or missing sum shows at 1e-3).
            assert_close(p.detach(), q.detach()[a:b], rtol=1e-6, atol=1e-7)
    for p in range(2):
        states = [opt.state[params[p]] for opt, params in zip(optimizers, shards)]
        for key in ("GG1", "Q1"):
            assert all(torch.equal(s[key], states[0][key]) for s in states[1:]), key
        # A Gram entry is a float32 sum of 32 terms up to the largest entry's size, so its rounding is relative to
        # that size (300 seeds: 1.5e-6 of max|GG|, and 1.4e-6 in the unit-sized eigenbases); a missing or partial
        # sum changes both at 1e-1.
        gg = one.state[whole[p]]["GG1"]
        assert_close(states[0]["GG1"], gg, rtol=0, atol=1e-5 * gg.abs().max().item())
        assert_close(states[0]["Q1"], one.state[whole[p]]["Q1"], rtol=0, atol=1e-5)


def test_soap_row_shard_without_a_sum_over_ranks_is_refused(rng):
    whole = random_params([(32, 16)], rng)[0]
    shard = whole.detach()[:16].clone().requires_grad_()
    opt = fastoptim.Soap([shard], block_size=8, max_precond_dim=32, merge_dims_target=0)
    opt.shard_of[shard] = RowShard(whole.shape, 0)
    shard.grad = torch.randn(shard.shape, generator=rng)
    with pytest.raises(RuntimeError, match=r"Soap: param_groups\[0\]\['params'\]\[0\] \(shape \(16, 16\)\) is rows of "
                                           r"a \(32, 16\) tensor, whose statistics sum over the ranks, but no "
                                           r"sum_over_ranks is set"):
        opt.step()


def test_soap_tiny_llama_loss_falls():
    losses = train_tiny(lambda m: fastoptim.Soap(m, lr=0.01, block_size=16, weight_decay=0.0))
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.6 * losses[0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(shampoo_beta=1.0), "shampoo_beta"), (dict(block_size=0), "block_size"),
    (dict(precondition_frequency=0), "precondition_frequency"), (dict(merge_dims_target=-1), "merge_dims_target"),
    (dict(betas=(0.9, 1.0)), "betas"), (dict(lr=float("inf")), "lr"),
])
def test_soap_rejects_bad_hyperparameters(kwargs, match, rng):
    with pytest.raises(ValueError, match=match):
        fastoptim.Soap(random_params([(4, 4)], rng), **kwargs)


# ---------------------------------------------------------------- Kron

KRON_HP = dict(betas=(0.9, 0.0), weight_decay=0.1, block_size=4, precond_lr=0.2, precond_update_prob_min=0.1,
               precond_update_flat_start=3, init_scale=1.0, max_size_triangular=16, max_grad_norm=2.0)


def run_kron(groups_spec, steps, gen, hp=KRON_HP, device="cpu", skipped=lambda step, group, index: False):
    """groups_spec: list of (shapes, refs, group options); the library and the float64 reference side by side.
    `skipped(step, group, index)`: that parameter has no gradient on that step."""
    from reference_matrix import kron_step
    params = [random_params(shapes, gen, device) for shapes, _, _ in groups_spec]
    seed = int(torch.randint(2**31, (), generator=gen))
    opt = fastoptim.Kron([dict(params=ps, **opts) for ps, (_, _, opts) in zip(params, groups_spec)], **hp, seed=seed)
    refs = [[p.detach().double().cpu() for p in ps] for ps in params]
    states = [[{} for _ in ps] for ps in params]
    noise_gen = torch.Generator(device)

    def draws(position, step):  # the library's stream of that parameter and step (its generator, reseeded)
        return lambda shape: torch.randn(shape, generator=noise_gen.manual_seed(kron_noise_seed(seed, position, step)),
                                         device=device).double().cpu()

    first_positions = [sum(len(shapes) for shapes, _, _ in groups_spec[:k]) for k in range(len(groups_spec))]
    updated = []
    for step in range(steps):
        grads = [random_grads(ps, gen) for ps in params]
        for k, (ps, gs) in enumerate(zip(params, grads)):
            set_grads(ps, gs)
            for j, p in enumerate(ps):
                if skipped(step, k, j):
                    p.grad = None
        opt.step()
        for k, (shapes, layouts, opts) in enumerate(groups_spec):
            g_hp = {**hp, **opts}
            present = [j for j in range(len(shapes)) if not skipped(step, k, j)]
            gs = [grads[k][j] for j in present]
            gs = gs if g_hp.get("normalize_grads") else clip_(gs, g_hp["max_grad_norm"])
            for j, g in zip(present, gs):
                p, st, lay = refs[k][j], states[k][j], layouts[j]
                updated.append(kron_step(
                    p, g, st, draws(first_positions[k] + j, step + 1), **lay, lr=g_hp["lr"], beta1=g_hp["betas"][0],
                    weight_decay=g_hp["weight_decay"],
                    normalize_grads=g_hp.get("normalize_grads", False), precond_lr=g_hp["precond_lr"],
                    p_min=g_hp["precond_update_prob_min"], flat_start=g_hp["precond_update_flat_start"],
                    init_scale=g_hp["init_scale"]))
    return params, refs, updated


def test_kron_matches_reference(rng, device):
    group_a = ([(8, 8), (6, 10), (5,), (4, 20)],
               [dict(merged=(8, 8), block_shape=(4, 4), diagonal=(False, False)),
                dict(merged=(6, 10), block_shape=(4, 4), diagonal=(False, False)),  # padded blocks
                dict(merged=(5,), block_shape=(5,), diagonal=(True,)),  # 1-D: diagonal, not split
                dict(merged=(4, 20), block_shape=(4, 20), diagonal=(False, True))],  # 20 > max_size_triangular
               dict(lr=0.01, merge_dims_target=0))
    group_b = ([(2, 3, 4), (12, 4)],
               [dict(merged=(6, 4), block_shape=(4, 4), diagonal=(False, False)),  # merged (2·3, 4)
                dict(merged=(12, 4), block_shape=(4, 4), diagonal=(False, False))],
               dict(lr=0.003, merge_dims_target=6, normalize_grads=True))
    params, refs, updated = run_kron([group_a, group_b], steps=7, gen=rng, device=device)
    # flat start 3: steps 1–3 update; then p = e^(−0.001·(t−3)) < 1 makes every other step wait once
    per_step = [updated[6 * s] for s in range(7)]
    assert per_step == [True, True, True, False, True, False, True]
    for ps, rs in zip(params, refs):
        for p, r in zip(ps, rs):
            assert_close(p.detach(), r, rtol=1e-4, atol=1e-5)


def test_kron_batches_parameters_of_different_step_counts(rng):
    # The second matrix has no gradient on the first two steps, so from then on it shares a block batch with the
    # first at a different bias correction. p stays 1 (flat start far away), so every step updates the factors and
    # the reference's per-parameter counters agree with the library's single schedule.
    group = ([(8, 8), (8, 8), (6,)],
             [dict(merged=(8, 8), block_shape=(4, 4), diagonal=(False, False))] * 2
             + [dict(merged=(6,), block_shape=(6,), diagonal=(True,))],
             dict(lr=0.01, merge_dims_target=0))
    hp = dict(KRON_HP, precond_update_flat_start=1000)
    params, refs, _ = run_kron([group], steps=5, gen=rng, hp=hp, skipped=lambda step, k, j: j == 1 and step < 2)
    for p, r in zip(params[0], refs[0]):
        assert_close(p.detach(), r, rtol=1e-4, atol=1e-5)


def test_kron_rebalances_after_100_updates_like_the_reference(rng):
    group = ([(8, 4), (3,)], [dict(merged=(8, 4), block_shape=(4, 4), diagonal=(False, False)),
                              dict(merged=(3,), block_shape=(3,), diagonal=(True,))], dict(lr=0.003))
    hp = dict(KRON_HP, precond_update_flat_start=10_000, merge_dims_target=0)
    params, refs, updated = run_kron([group], steps=103, gen=rng, hp=hp)
    assert all(updated)
    for p, r in zip(params[0], refs[0]):
        assert_close(p.detach(), r, rtol=1e-3, atol=1e-4)


def test_kron_update_schedule_follows_the_counter_rule(rng):
    def update_steps(flat_start, p_min, steps):
        params = random_params([(4, 4)], rng)
        opt = fastoptim.Kron(params, block_size=4, precond_update_flat_start=flat_start,
                             precond_update_prob_min=p_min, merge_dims_target=0)
        gen, out = rng, []
        for t in range(1, steps + 1):
            set_grads(params, random_grads(params, gen))
            state = opt.state.get(params[0])
            before = state["Q0"].clone() if state else torch.eye(4)[None]  # the factor starts at init_scale·I
            opt.step()
            if not torch.equal(before, opt.state[params[0]]["Q0"]):
                out.append(t)
        return out

    # p = p_min = 0.5 throughout (t − flat_start ≫ 1000): the counter reaches 1/p = 2 on every second step
    assert update_steps(-5000, 0.5, 9) == [2, 4, 6, 8]
    # p_min = 0.25: every fourth step
    assert update_steps(-5000, 0.25, 12) == [4, 8, 12]
    # flat start 4: p = 1 through t = 4, then p slightly below 1 needs a second count each time
    assert update_steps(4, 0.1, 9) == [1, 2, 3, 4, 6, 8]


@pytest.mark.parametrize("fused", [None, False])
def test_kron_row_shards_with_summed_statistics_step_as_the_whole_tensor(fused, rng, device, monkeypatch):
    """What a rank of ZeRO-1 or FSDP2 does with a tensor whose axis 0 has a diagonal factor (the vocabulary): three
    ranks each step their rows (11, 11, 10 of 32) of two such tensors, batched together, with the other factors'
    terms and the per-tensor norms summed over the ranks and the diagonal normaliser maxed over them, and each
    rank's rows of the whole tensor's noise. After six steps, every one a preconditioner update and every second
    one a rebalancing, every rank's rows are the whole tensor's stepped in one process, and every rank holds the
    same triangular factors, bit for bit. The gradients' columns are scaled 10, 20, …, 80 per block: the spectral
    bound picks the largest column of its statistics, and columns that different sums round apart could swap."""
    import fastoptim.optim.kron as kron_module

    monkeypatch.setattr(kron_module, "BALANCE_EVERY", 2)
    rows, cols, block = 32, 16, 8
    hp = dict(lr=0.01, betas=(0.9, 0.0), weight_decay=0.1, block_size=block, precond_lr=0.2,
              precond_update_flat_start=100, max_size_triangular=rows - 1, merge_dims_target=0, fused=fused)
    whole = random_params([(rows, cols), (rows, cols)], rng, device)
    scales = 10 * (1 + torch.arange(block, dtype=torch.float32)).repeat(cols // block)
    grads = [[torch.randn(rows, cols, generator=rng) * scales for _ in range(6)] for _ in whole]
    spans = [(0, 11), (11, 22), (22, 32)]
    one, shards, optimizers, _ = step_row_shards_and_whole(fastoptim.Kron, hp, whole, grads, spans)
    assert one.row_axes(one.param_groups[0], whole[0]) == {"exp_avg": 0, "Q0": 1, "Q1": None}
    for (a, b), params, opt in zip(spans, shards, optimizers):
        for p, q in zip(params, whole):
            # Sums over the ranks round differently from one process's: a few float32 ulps of the parameter (the
            # six updates are about 6e-2 per element; leaving out any one collective shows at 1e-4).
            assert_close(p.detach(), q.detach()[a:b], rtol=1e-6, atol=1e-7)
            assert_close(opt.state[p]["Q0"], one.state[q]["Q0"][:, a:b], rtol=1e-5, atol=0)
    for p in range(2):
        factors = [opt.state[params[p]]["Q1"] for opt, params in zip(optimizers, shards)]
        assert all(torch.equal(f, factors[0]) for f in factors[1:])
        assert_close(factors[0], one.state[whole[p]]["Q1"], rtol=0, atol=1e-5)


def test_kron_state_dict_round_trip_continues_identically(rng):
    make = lambda ps: fastoptim.Kron([{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-4, "normalize_grads": True}],
                                     block_size=4, merge_dims_target=0, precond_update_flat_start=2,
                                     precond_update_prob_min=0.3, seed=3)
    params = random_params([(8, 6), (6,), (5, 4), (3, 2, 2)], rng)
    straight, resumed = run_and_resume(make, [params], steps=4, gen=rng)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_kron_zero_gradient_gives_finite_zero_update(rng):
    params = random_params([(8, 6), (5,)], rng)
    before = [p.detach().clone() for p in params]
    opt = fastoptim.Kron(params, weight_decay=0.0, block_size=4)
    for _ in range(3):
        set_grads(params, [torch.zeros_like(p) for p in params])
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


def test_kron_tiny_llama_loss_falls():
    losses = train_tiny(lambda m: fastoptim.Kron(m, lr=0.03, block_size=16, weight_decay=0.0, normalize_grads=True))
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.6 * losses[0]


def test_kron_load_rejects_a_foreign_state_dict(rng):
    params = random_params([(4, 4)], rng)
    other = fastoptim.Soap(params)
    with pytest.raises(ValueError, match="kron"):
        fastoptim.Kron(params).load_state_dict(other.state_dict())


def test_kron_refuses_a_state_dict_of_the_shared_noise_generator(rng):
    """A state saved when one generator drew every parameter's noise cannot resume the same draws: refused, nothing
    loaded."""
    params = random_params([(4, 4)], rng)
    saved = fastoptim.Kron(params, block_size=4)
    set_grads(params, random_grads(params, rng))
    saved.step()
    old = saved.state_dict()
    old["kron"]["generators"] = {"cpu": torch.Generator().get_state()}
    fresh = fastoptim.Kron(params, block_size=4)
    with pytest.raises(ValueError, match="one shared generator"):
        fresh.load_state_dict(old)
    assert not fresh.state and fresh.schedule["step"] == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(precond_update_prob_min=0.0), "precond_update_prob_min"), (dict(block_size=0), "block_size"),
    (dict(normalize_grads=1), "normalize_grads"), (dict(precond_lr=-0.1), "precond_lr"),
    (dict(betas=(1.2, 0.0)), "betas"), (dict(seed=1.5), "seed"), (dict(max_size_triangular=0), "max_size_triangular"),
])
def test_kron_rejects_bad_hyperparameters(kwargs, match, rng):
    with pytest.raises(ValueError, match=match):
        fastoptim.Kron(random_params([(4, 4)], rng), **kwargs)


# ---------------------------------------------------------------- construction by name, schedulers, dtypes

@pytest.mark.parametrize("name, hparams, expected", [
    ("muon", dict(lr=0.016, beta1=0.8, beta2=0.98, momentum=0.95, adam_lr_ratio=0.2, muon_eps=1e-5, ns_steps=10),
     dict(adam_betas=(0.8, 0.98), ns_steps=10, eps=1e-5, adam_eps=1e-8)),
    ("scion", dict(lr=0.008, beta1=0.98, signum_lr_ratio=0.1, scion_eps=1e-5), dict(betas=(0.98, 0.98))),
    ("soap", dict(lr=0.008, beta1=0.95, beta2=0.99, shampoo_beta=0.98, block_size=512, precondition_frequency=10),
     dict(betas=(0.95, 0.99), block_size=512)),
    ("kron", dict(lr=1e-3, beta1=0.95, normalize_grads=True, precond_lr=0.2, precond_update_flat_start=2000),
     dict(betas=(0.95, 0.0), normalize_grads=True)),
])
def test_build_optimizer_takes_the_flat_benchmark_keys(name, hparams, expected):
    opt = fastoptim.build_optimizer(name, TinyLlama(n_layers=1), hparams)
    for group in opt.param_groups:
        for key, value in expected.items():
            assert group[key] == value


@pytest.mark.parametrize("cls", [fastoptim.Muon, fastoptim.Scion, fastoptim.Soap, fastoptim.Kron])
def test_lr_scheduler_drives_the_step(cls, rng):
    params = random_params([(8, 4), (4,)], rng)
    opt = cls(params, lr=0.1, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)  # lr 0: no update, no decay
    before = [p.detach().clone() for p in params]
    for _ in range(2):
        set_grads(params, random_grads(params, rng))
        opt.step()
        scheduler.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


def test_kron_factors_stay_float32_for_bf16_parameters_across_a_round_trip(rng):
    params = [p.detach().bfloat16().requires_grad_() for p in random_params([(8, 4)], rng)]
    opt = fastoptim.Kron(params, block_size=4, merge_dims_target=0)
    set_grads(params, [g.bfloat16() for g in random_grads(params, rng)])
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    again = fastoptim.Kron(params, block_size=4, merge_dims_target=0)
    again.load_state_dict(saved)
    q = again.state[params[0]]["Q0"]
    assert q.dtype == torch.float32 and torch.equal(q, saved["state"][0]["Q0"])
    set_grads(params, [g.bfloat16() for g in random_grads(params, rng)])
    again.step()


@pytest.mark.parametrize("cls", ALL)
def test_native_ops_path_matches_pure_torch(cls, rng):
    """fused=None takes the native ops; fused=False stays pure torch; float32 rounding apart, they agree."""
    shapes = [(8, 6), (6, 10), (5,), (3, 2, 2)]
    pure = random_params(shapes, rng)
    native = [p.detach().clone().requires_grad_() for p in pure]
    # Soap without the clip: its first eigenbasis is only defined up to a rotation within the null space of the
    # first statistics (rank one for a 1-D block), so the last-bit difference between the native and the torch
    # clip factor picks another basis there, and the Adam step in that basis differs (Levanter's does the same).
    hp = {fastoptim.Soap: dict(block_size=4, max_grad_norm=0.0), fastoptim.Kron: dict(block_size=4),
          fastoptim.Muon: dict(ns_dtype=torch.float32), fastoptim.Scion: dict(ns_dtype=torch.float32)}.get(cls, {})
    opts = [cls(ps, fused=fused, **hp) for ps, fused in ((pure, False), (native, None))]
    for _ in range(3):
        grads = random_grads(pure, rng)
        for ps, opt in zip((pure, native), opts):
            set_grads(ps, grads)
            opt.step()
    for a, b in zip(pure, native):
        assert_close(b.detach(), a.detach(), rtol=1e-6, atol=1e-6)
