"""Tensors for a shape set: plain parameter lists for op benchmarks, and an nn.Module with the spec's Llama names
(no forward) for optimizer steps that route parameters by name. Values are random, seeded, made on the device."""

import torch
from torch import nn

from fastoptim.bench.shapes import ShapeSet

SEED = 0


def _generator(device: torch.device, offset: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(SEED + offset)


def make_tensors(shapes: ShapeSet, device, dtype=torch.float32, kinds=None, scale=0.02, offset=0) -> list[torch.Tensor]:
    """One random N(0, scale²) tensor per parameter of `shapes` (only those of `kinds` when given)."""
    device = torch.device(device)
    gen = _generator(device, offset)
    params = shapes.params if kinds is None else shapes.of_kind(*kinds)
    return [torch.randn(p.shape, generator=gen, device=device, dtype=dtype).mul_(scale) for p in params]


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int, **factory):
        super().__init__()
        self.n_heads, self.head_dim = heads, d // heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False, **factory) for _ in range(4))


class _MLP(nn.Module):
    def __init__(self, d: int, ff: int, **factory):
        super().__init__()
        self.gate_proj = nn.Linear(d, ff, bias=False, **factory)
        self.up_proj = nn.Linear(d, ff, bias=False, **factory)
        self.down_proj = nn.Linear(ff, d, bias=False, **factory)


class _Block(nn.Module):
    def __init__(self, d: int, ff: int, heads: int, **factory):
        super().__init__()
        self.attn_norm, self.mlp_norm = nn.RMSNorm(d, **factory), nn.RMSNorm(d, **factory)
        self.attn, self.mlp = _Attention(d, heads, **factory), _MLP(d, ff, **factory)


class ParamModel(nn.Module):
    """The parameters of the spec's Llama under the names fastoptim's routing and the trainer's model use."""

    def __init__(self, shapes: ShapeSet, **factory):
        super().__init__()
        dims = shapes.dims
        if dims is None:
            raise ValueError(f"ParamModel: shape set {shapes.name!r} is not a model set")
        d = dims.hidden
        self.embed_tokens = nn.Embedding(dims.vocab, d, **factory)
        self.layers = nn.ModuleList(_Block(d, dims.intermediate, dims.heads, **factory) for _ in range(dims.layers))
        self.norm = nn.RMSNorm(d, **factory)
        self.lm_head = nn.Linear(d, dims.vocab, bias=False, **factory)


def param_model(shapes: ShapeSet, device, dtype=torch.float32, with_grads: bool = True) -> ParamModel:
    """A ParamModel on `device` with random weights (and random gradients), allocated directly there."""
    device = torch.device(device)
    model = ParamModel(shapes, device=device, dtype=dtype)
    named = dict(model.named_parameters())
    expected = {p.name: p.shape for p in shapes.params}
    if {n: tuple(p.shape) for n, p in named.items()} != expected:
        raise AssertionError(f"ParamModel's parameters differ from shape set {shapes.name!r}")
    weights, grads = _generator(device), _generator(device, 1)
    with torch.no_grad():
        for name, p in named.items():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=weights)
            if with_grads:
                p.grad = torch.empty_like(p).normal_(0.0, 1e-3, generator=grads)
    return model
