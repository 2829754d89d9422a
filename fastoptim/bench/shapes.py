"""The shape sets benchmarks run on: the parameter lists of the spec's models and single matrices.

A model set lists every parameter of the spec's Llama (benchmark-spec §2) by its dotted name, so that the optimizer
routing (fastoptim.optim.routing) sees the same kinds it sees in training:
  embed_tokens, lm_head                     vocab × d
  layers.{i}.attn.{q,k,v,o}_proj            d × d
  layers.{i}.mlp.{gate,up}_proj             d_ff × d
  layers.{i}.mlp.down_proj                  d × d_ff
  layers.{i}.{attn,mlp}_norm, norm          d
The non-embedding count N of the spec (32·(3·d·d_ff + 4·d²) = 512·d²) counts the hidden matrices only.

Large sets (the spec's 130M / 520M / 1.2B, matrices up to 4096×11008) are for GPUs; on a CPU the suite runs small
sets with the same structure, so that a 2-core machine measures in seconds and never allocates gigabytes.
"""

from dataclasses import dataclass

VOCAB = 128_256


@dataclass(frozen=True)
class ModelDims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int = VOCAB


# benchmark-spec §2, Table 2.
SPEC_MODELS = {
    "130m": ModelDims(hidden=512, intermediate=2048, layers=32, heads=8),
    "300m": ModelDims(hidden=768, intermediate=3072, layers=32, heads=12),
    "520m": ModelDims(hidden=1024, intermediate=4096, layers=32, heads=16),
    "1.2b": ModelDims(hidden=1536, intermediate=6144, layers=32, heads=24),
}
# Same structure, sized for a 2-core CPU (an AdamW step over cpu-tiny moves ~50 MB).
CPU_MODELS = {
    "cpu-tiny": ModelDims(hidden=128, intermediate=512, layers=2, heads=2, vocab=8192),
    "cpu-small": ModelDims(hidden=256, intermediate=1024, layers=4, heads=4, vocab=16384),
}


@dataclass(frozen=True)
class ParamShape:
    name: str
    shape: tuple[int, ...]
    kind: str  # "embedding", "head", "matrix" or "norm", as fastoptim.optim.routing names them

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class ShapeSet:
    """A named list of parameter shapes. `kind` is "model" (a whole model's parameters) or "matrix" (one matrix);
    `devices` says where it runs: the large sets on "cuda" only, the small ones on "cpu" (some on both)."""

    name: str
    kind: str
    devices: tuple[str, ...]
    params: tuple[ParamShape, ...]
    dims: ModelDims | None = None

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)

    def of_kind(self, *kinds: str) -> tuple[ParamShape, ...]:
        return tuple(p for p in self.params if p.kind in kinds)

    @property
    def non_embedding_numel(self) -> int:
        """The spec's N: the hidden matrices only (no embeddings, head or norms)."""
        return sum(p.numel for p in self.of_kind("matrix"))


def model_params(dims: ModelDims) -> tuple[ParamShape, ...]:
    d, ff = dims.hidden, dims.intermediate
    params = [ParamShape("embed_tokens.weight", (dims.vocab, d), "embedding")]
    for i in range(dims.layers):
        attn, mlp = f"layers.{i}.attn", f"layers.{i}.mlp"
        params += [ParamShape(f"{attn}.{proj}.weight", (d, d), "matrix") for proj in ("q_proj", "k_proj", "v_proj", "o_proj")]
        params += [
            ParamShape(f"{mlp}.gate_proj.weight", (ff, d), "matrix"),
            ParamShape(f"{mlp}.up_proj.weight", (ff, d), "matrix"),
            ParamShape(f"{mlp}.down_proj.weight", (d, ff), "matrix"),
            ParamShape(f"layers.{i}.attn_norm.weight", (d,), "norm"),
            ParamShape(f"layers.{i}.mlp_norm.weight", (d,), "norm"),
        ]
    params += [ParamShape("norm.weight", (d,), "norm"), ParamShape("lm_head.weight", (dims.vocab, d), "head")]
    return tuple(params)


def _model_set(name: str, dims: ModelDims, *devices: str) -> ShapeSet:
    return ShapeSet(name, "model", devices, model_params(dims), dims)


def _matrix_set(rows: int, cols: int, *devices: str, batch: int = 1) -> ShapeSet:
    """One matrix ("RxC"), or a batch of same-shape matrices ("BxRxC": what one batched Newton–Schulz call takes)."""
    if batch == 1:
        return ShapeSet(f"{rows}x{cols}", "matrix", devices, (ParamShape("weight", (rows, cols), "matrix"),))
    return ShapeSet(f"{batch}x{rows}x{cols}", "matrix", devices,
                    tuple(ParamShape(f"weight.{i}", (rows, cols), "matrix") for i in range(batch)))


# Listed smallest first per device and kind: the quick (CI) subset takes the first of each.
SHAPE_SETS = {
    s.name: s
    for s in (
        *(_model_set(name, dims, "cpu") for name, dims in CPU_MODELS.items()),
        *(_model_set(name, SPEC_MODELS[name], "cuda") for name in ("130m", "520m", "1.2b")),
        _matrix_set(256, 256, "cpu"),
        _matrix_set(512, 512, "cpu", "cuda"),
        _matrix_set(512, 1376, "cpu"),  # 4096×11008 scaled by 1/8
        *(_matrix_set(r, c, "cuda") for r, c in ((1024, 1024), (2048, 2048), (4096, 4096), (4096, 11008))),
        # the batches issue 14 asks Newton–Schulz's methods to be compared on
        *(_matrix_set(r, c, "cuda", batch=b) for b, r, c in ((128, 512, 512), (64, 512, 2048), (8, 4096, 4096))),
    )
}


def shape_sets(kind: str, device: str, names=None, quick: bool = False) -> list[ShapeSet]:
    """The sets of `kind` that run on `device` ("cpu" or "cuda"), restricted to `names` when given.

    Sets sized for the GPU never run on a CPU (they would take gigabytes and minutes), so a benchmark that names only
    GPU sets still runs its CPU sets there. `quick` keeps the smallest set only (CI's subset).
    """
    if names is not None:
        unknown = sorted(set(names) - set(SHAPE_SETS))
        if unknown:
            raise ValueError(f"shape_sets: unknown set(s) {unknown}; known: {sorted(SHAPE_SETS)}")
    sets = [s for s in SHAPE_SETS.values() if s.kind == kind and device in s.devices]
    if names is not None:
        named = [s for s in sets if s.name in names]
        sets = named if named or device != "cpu" else sets
    return sets[:1] if quick else sets
