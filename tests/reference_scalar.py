"""Float64 reference of the scalar optimizers, written from benchmark-spec §1 element by element.

Independent of fastoptim: plain tensor arithmetic on one tensor at a time, no foreach, no library code. A
reference optimizer holds groups of float64 tensors ({"params": [...], **hyperparameters}) and its own state;
``step(grads)`` takes one list of gradients per group, in order.
"""

import math

import torch


def global_norm(tensors):
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors))


def clip_factor(tensors, max_norm):
    """optax clip_by_global_norm: unchanged below max_norm, scaled onto it above; 0 = off."""
    if max_norm == 0:
        return 1.0
    norm = global_norm(tensors)
    return 1.0 if norm < max_norm else max_norm / norm


def adam_moments(state, g, beta1, beta2):
    state["t"] = state.get("t", 0) + 1
    state["m"] = beta1 * state.get("m", torch.zeros_like(g)) + (1 - beta1) * g
    state["v"] = beta2 * state.get("v", torch.zeros_like(g)) + (1 - beta2) * g * g
    return state["t"]


def adam_direction(state, g, hp, nesterov=False):
    beta1, beta2 = hp["betas"]
    t = adam_moments(state, g, beta1, beta2)
    if nesterov:
        m_hat = beta1 * state["m"] / (1 - beta1 ** (t + 1)) + (1 - beta1) * g / (1 - beta1**t)
    else:
        m_hat = state["m"] / (1 - beta1**t)
    v_hat = state["v"] / (1 - beta2**t)
    return m_hat / (torch.sqrt(v_hat) + hp["eps"])


def cautious_direction(state, g, hp):
    u = adam_direction(state, g, hp)
    mask = (u * g > 0).double()
    return u * mask / (mask.mean() + hp["eps"])


def lion_direction(state, g, hp):
    beta1, beta2 = hp["betas"]
    m = state.get("m", torch.zeros_like(g))
    u = torch.sign(beta1 * m + (1 - beta1) * g)
    state["m"] = beta2 * m + (1 - beta2) * g
    return u


def mini_direction(state, g, hp, n_blocks):
    """Second moment per block: the flattened tensor cut into n_blocks equal contiguous pieces."""
    beta1, beta2 = hp["betas"]
    state["t"] = t = state.get("t", 0) + 1
    state["m"] = beta1 * state.get("m", torch.zeros_like(g)) + (1 - beta1) * g
    flat_g = g.reshape(-1)
    size = flat_g.numel() // n_blocks
    v = state.get("v", torch.zeros(n_blocks, dtype=g.dtype))
    block_mean = torch.stack([(flat_g[b * size : (b + 1) * size] ** 2).mean() for b in range(n_blocks)])
    state["v"] = v = beta2 * v + (1 - beta2) * block_mean
    denominator = (torch.sqrt(v / (1 - beta2**t)) + hp["eps"]).repeat_interleave(size).reshape(g.shape)
    return state["m"] / (1 - beta1**t) / denominator


def sophia_direction(state, g, hp):
    beta1 = hp["betas"][0]
    state["t"] = t = state.get("t", 0) + 1
    state["m"] = beta1 * state.get("m", torch.zeros_like(g)) + (1 - beta1) * g
    h = state.get("h", torch.zeros_like(g))
    ratio = (state["m"] / (1 - beta1**t)) / torch.clamp(hp["gamma"] * h, min=hp["eps"])
    return torch.clamp(ratio, -hp["clip_threshold"], hp["clip_threshold"])


class Reference:
    """A float64 optimizer from the spec. `name` in adamw nadamw cautious mars lion mini sophia.

    For "mini", each group's "n_blocks" lists the block count per tensor, or None for the AdamW branch (the only
    clipped one). Groups sharing a max_grad_norm are clipped by one global norm.
    """

    def __init__(self, name, groups):
        self.name = name
        self.groups = [{**g, "params": [p.detach().double().clone() for p in g["params"]]} for g in groups]
        self.state = [[{} for _ in g["params"]] for g in self.groups]

    def direction(self, group, state, g, index):
        if self.name in ("adamw", "mars"):
            return adam_direction(state, g, group)
        if self.name == "nadamw":
            return adam_direction(state, g, group, nesterov=True)
        if self.name == "cautious":
            return cautious_direction(state, g, group)
        if self.name == "lion":
            return lion_direction(state, g, group)
        if self.name == "sophia":
            return sophia_direction(state, g, group)
        blocks = group["n_blocks"][index]
        return adam_direction(state, g, group) if blocks is None else mini_direction(state, g, group, blocks)

    def clipped(self, group, index):
        return self.name != "mini" or group["n_blocks"][index] is None

    def step(self, grads_per_group, lrs=None):
        """One step; a None gradient is a parameter without a gradient this step: skipped, its state untouched."""
        grads_per_group = [[None if g is None else g.detach().double().clone() for g in grads]
                           for grads in grads_per_group]
        if self.name == "mars":  # corrected gradient, then it is what gets clipped
            for group, states, grads in zip(self.groups, self.state, grads_per_group):
                beta1 = group["betas"][0]
                for i, (st, g) in enumerate(zip(states, grads)):
                    if g is None:
                        continue
                    prev = st.get("prev", torch.zeros_like(g))
                    st["prev"] = g.clone()
                    grads[i] = g + group["gamma"] * beta1 / (1 - beta1) * (g - prev)
        factors = {}
        for limit in {group.get("max_grad_norm", 0) for group in self.groups}:
            members = [
                g
                for group, grads in zip(self.groups, grads_per_group)
                if group.get("max_grad_norm", 0) == limit
                for i, g in enumerate(grads)
                if g is not None and self.clipped(group, i)
            ]
            factors[limit] = clip_factor(members, limit)
        for k, (group, states, grads) in enumerate(zip(self.groups, self.state, grads_per_group)):
            lr = group["lr"] if lrs is None else lrs[k]
            for i, (p, st, g) in enumerate(zip(group["params"], states, grads)):
                if g is None:
                    continue
                if self.clipped(group, i):
                    g = g * factors[group.get("max_grad_norm", 0)]
                u = self.direction(group, st, g, i)
                decay = group["weight_decay"] if group.get("decay", True) else 0.0
                p.sub_(lr * (u + decay * p))

    def update_hessian(self, estimates_per_group):
        for group, states, estimates in zip(self.groups, self.state, estimates_per_group):
            beta2 = group["betas"][1]
            for st, e in zip(states, estimates):
                st["h"] = beta2 * st.get("h", torch.zeros_like(e)) + (1 - beta2) * e.double()
