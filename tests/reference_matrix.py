"""Float64 references for the matrix optimizers, written from benchmark-spec §1.7–§1.10 without the library.

Each reference works on plain tensors, one parameter (and one block) at a time, so that its loops read like the
spec; the library batches and fuses, the references do not. State lives in plain dicts.
"""

import math

import torch

NS = (3.4445, -4.7750, 2.0315)


# ---------------------------------------------------------------- Muon / Scion (§1.7, §1.8)
def ns_reference(u, steps, eps):
    a, b, c = NS
    x = u.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def shape_scale(shape, mode="spectral"):
    d_out, d_in = shape[0], math.prod(shape[1:])
    return math.sqrt(max(1.0, d_out / d_in)) if mode == "spectral" else 0.2 * math.sqrt(max(d_out, d_in))


def muon_matrix_step(p, g, state, *, lr, momentum, nesterov, ns_steps, eps, weight_decay, scale="spectral", ema=False):
    """One Muon (ema=False) or Scion (ema=True, no Nesterov) step for a matrix; p is updated in place (float64)."""
    buf = state.setdefault("buf", torch.zeros_like(p))
    g = g.double()
    if ema:
        buf.mul_(momentum).add_((1 - momentum) * g)
        u = buf.clone()
    else:
        buf.mul_(momentum).add_(g)
        u = momentum * buf + g if nesterov else buf.clone()
    o = ns_reference(u.reshape(p.shape[0], -1), ns_steps, eps).reshape(p.shape)
    p.sub_(lr * (shape_scale(p.shape, scale) * o + weight_decay * p))


def clip_(grads, max_norm):
    """Global-norm clipping of a list of float64 gradients; returns the clipped copies."""
    if not max_norm:
        return list(grads)
    total = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    factor = min(1.0, max_norm / total)  # optax's clip_by_global_norm
    return [g.double() * factor for g in grads]


def adamw_step(p, g, state, *, lr, betas, eps, weight_decay):
    b1, b2 = betas
    t = state["t"] = state.get("t", 0) + 1
    m = state.setdefault("m", torch.zeros_like(p))
    v = state.setdefault("v", torch.zeros_like(p))
    m.mul_(b1).add_((1 - b1) * g)
    v.mul_(b2).add_((1 - b2) * g * g)
    u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    p.sub_(lr * (u + weight_decay * p))


def signum_step(p, g, state, *, lr, beta, weight_decay):
    m = state.setdefault("m", torch.zeros_like(p))
    m.mul_(beta).add_((1 - beta) * g)
    p.sub_(lr * (torch.sign(m) + weight_decay * p))


# ---------------------------------------------------------------- block layout shared by Soap and Kron
def blocks_of(t, block_shape):
    """Split a tensor into zero-padded blocks of `block_shape` (axis by axis, row-major block order)."""
    pieces = [t]
    for axis, b in enumerate(block_shape):
        pieces = [q for piece in pieces for q in torch.split(piece, b, dim=axis)]
    out = []
    for q in pieces:
        padded = torch.zeros(block_shape, dtype=q.dtype)
        padded[tuple(slice(0, s) for s in q.shape)] = q
        out.append(padded)
    return out


def unblocks(blocks, shape, block_shape):
    out = torch.zeros(shape, dtype=blocks[0].dtype)
    counts = [math.ceil(d / b) for d, b in zip(shape, block_shape)]
    for k, blk in enumerate(blocks):
        index, rest = [], k
        for c in reversed(counts):
            index.append(rest % c)
            rest //= c
        index.reverse()
        region = tuple(slice(i * b, min((i + 1) * b, d)) for i, b, d in zip(index, block_shape, shape))
        out[region] = blk[tuple(slice(0, r.stop - r.start) for r in region)]
    return out


def unfold(t, axis):
    """The matrix whose rows are indexed by `axis`: t_(axis), shape (d_axis, rest)."""
    return t.movedim(axis, 0).reshape(t.shape[axis], -1)


def along(t, axis, mat):
    """Multiply `t` along `axis` by `mat` (out[.., i, ..] = Σ_j mat[i, j] t[.., j, ..])."""
    return torch.tensordot(mat, t, dims=([1], [axis])).movedim(0, axis)


# ---------------------------------------------------------------- Soap (§1.10)
def into_eigenbasis(block, qs):
    """The block in the eigenbasis `qs` (one matrix per axis, None where the axis is not rotated)."""
    for i, q in enumerate(qs):
        if q is not None:
            block = along(block, i, q.T)
    return block


def soap_rotated_grad(g, state, *, merged, block_shape):
    """The blocks of g as the next soap_step would see them in the eigenbasis; [] before the first step."""
    if "Q" not in state:
        return []
    blocks = blocks_of(g.double().reshape(merged), block_shape)
    return [into_eigenbasis(blk, qs) for blk, qs in zip(blocks, state["Q"])]


def soap_step(p, g, state, *, merged, block_shape, rotate, lr, betas, shampoo_beta, eps, weight_decay, freq):
    """One Soap step for parameter p (float64, in place). `merged`: the shape after merging small dims;
    `block_shape`: per merged axis the block size; `rotate`: per merged axis whether it gets an eigenbasis."""
    b1, b2 = betas
    t = state["t"] = state.get("t", 0) + 1
    gb = blocks_of(g.double().reshape(merged), block_shape)
    if t == 1:
        state["m"] = torch.zeros_like(p)
        state["v"] = [torch.zeros(block_shape, dtype=torch.float64) for _ in gb]
        state["GG"], state["Q"] = [], []
        for blk in gb:
            ggs = [(1 - shampoo_beta) * unfold(blk, i) @ unfold(blk, i).T if r else None for i, r in enumerate(rotate)]
            qs = []
            for gg in ggs:
                if gg is None:
                    qs.append(None)
                    continue
                _, vecs = torch.linalg.eigh(gg + eps * torch.eye(gg.shape[0], dtype=torch.float64))
                qs.append(vecs.flip(1))
            state["GG"].append(ggs)
            state["Q"].append(qs)
        p.sub_(lr * weight_decay * p)
        return
    m = state["m"]
    m.mul_(b1).add_((1 - b1) * g.double())
    mb = blocks_of(m.reshape(merged), block_shape)
    corr = math.sqrt(1 - b2**t) / (1 - b1**t)
    ub = []
    for k, (gk, mk) in enumerate(zip(gb, mb)):
        qs, ggs, v = state["Q"][k], state["GG"][k], state["v"][k]
        gr, mr = into_eigenbasis(gk, qs), into_eigenbasis(mk, qs)
        v.mul_(b2).add_((1 - b2) * gr * gr)
        u = mr / (v.sqrt() + eps)
        for i, q in enumerate(qs):
            if q is not None:
                u = along(u, i, q)
        ub.append(u * corr)
        new_ggs = [None if gg is None else gg + (1 - shampoo_beta) * (unfold(gk, i) @ unfold(gk, i).T - gg)
                   for i, gg in enumerate(ggs)]
        if t % freq == 0:
            for i, (gg, q) in enumerate(zip(ggs, qs)):
                if q is None:
                    continue
                order = torch.argsort(torch.diag(q.T @ gg @ q), descending=True)
                v = v.index_select(i, order)
                qs[i], _ = torch.linalg.qr(gg @ q[:, order])
            state["v"][k] = v
        state["GG"][k] = new_ggs
    u = unblocks(ub, merged, block_shape).reshape(p.shape)
    p.sub_(lr * (u + weight_decay * p))


# ---------------------------------------------------------------- Kron (§1.9)
def norm_lower_bound(a):
    """The spec's cheap lower bound on the spectral norm of a symmetric matrix."""
    max_abs = a.abs().max()
    if max_abs == 0:
        return max_abs
    a = a / max_abs
    x = a[:, torch.argmax((a * a).sum(0))] @ a
    return max_abs * torch.linalg.norm((x / torch.linalg.norm(x)) @ a.T)


def kron_update_prob(t, flat_start, p_min):
    return min(max(math.exp(-0.001 * (t - flat_start)), p_min), 1.0)


def kron_step(p, g, state, draw_noise, *, merged, block_shape, diagonal, lr, beta1, weight_decay, normalize_grads,
              precond_lr, p_min, flat_start, init_scale):
    """One Kron step for parameter p (float64, in place). `draw_noise(shape)`: the N(0, I) tensor of all blocks
    that a preconditioner update draws. Returns whether the preconditioner was updated."""
    t = state["t"] = state.get("t", 0) + 1
    g = g.double()
    if normalize_grads:
        g = g / (g.norm() + 1e-16)
    m = state.setdefault("m", torch.zeros_like(p))
    m.mul_(beta1).add_((1 - beta1) * g)
    mhat = m / (1 - beta1**t)
    mb = blocks_of(mhat.reshape(merged), block_shape)
    if "Q" not in state:
        s = init_scale ** (1 / len(block_shape))
        state["Q"] = [[s * (torch.ones(d, dtype=torch.float64) if dg else torch.eye(d, dtype=torch.float64))
                       for d, dg in zip(block_shape, diagonal)] for _ in mb]
        state["counter"], state["balance"] = 0, 0
    state["counter"] += 1
    update = state["counter"] >= 1 / kron_update_prob(t, flat_start, p_min)
    if update:
        state["counter"] = 0
        state["balance"] += 1
        if state["balance"] >= 100:
            state["balance"] = 0
            for qs in state["Q"]:
                norms = torch.stack([q.abs().max() for q in qs])
                gmean = torch.exp(torch.log(norms).mean())
                for i in range(len(qs)):
                    qs[i] = qs[i] * (gmean / norms[i])
        mean_abs = torch.stack(mb).abs().mean()
        v_noise = draw_noise((len(mb), *block_shape))
        for k, (mk, vk) in enumerate(zip(mb, v_noise)):
            qs = state["Q"][k]
            gk = mk + math.sqrt(torch.finfo(torch.float32).eps) * mean_abs * vk
            a, conj = gk, vk.double()
            for i, q in enumerate(qs):
                if diagonal[i]:
                    shape = [1] * len(qs)
                    shape[i] = -1
                    a = a * q.reshape(shape)
                    conj = conj / q.reshape(shape)
                else:
                    a = along(a, i, q)
                    conj = along(conj, i, torch.linalg.inv(q).T)
            new = []
            for i, q in enumerate(qs):
                if diagonal[i]:
                    term1 = (unfold(a, i) ** 2).sum(1)
                    term2 = (unfold(conj, i) ** 2).sum(1)
                    step = precond_lr / ((term1 + term2).abs().max() + torch.finfo(torch.float64).tiny)
                    new.append(q - step * (term1 - term2) * q)
                else:
                    term1 = unfold(a, i) @ unfold(a, i).T
                    term2 = unfold(conj, i) @ unfold(conj, i).T
                    step = precond_lr / (norm_lower_bound(term1 + term2) + torch.finfo(torch.float64).tiny)
                    new.append(q - step * torch.triu(term1 - term2) @ q)
            state["Q"][k] = new
    ub = []
    for k, mk in enumerate(mb):
        u = mk
        for i, q in enumerate(state["Q"][k]):
            if diagonal[i]:
                shape = [1] * len(block_shape)
                shape[i] = -1
                u = u * (q * q).reshape(shape)
            else:
                u = along(u, i, q.T @ q)
        ub.append(u)
    u = unblocks(ub, merged, block_shape).reshape(p.shape)
    u = u / max(1.0, float(u.pow(2).mean().sqrt()) / 1.1)
    p.sub_(lr * (u + weight_decay * p))
    return update
