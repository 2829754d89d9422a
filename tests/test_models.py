import dataclasses
import math

import pytest
import torch

import torch.nn.functional as F

from fastoptim.models import MODEL_CONFIGS, Llama, get_model_config, non_embedding_params
from fastoptim.models.cross_entropy import linear_cross_entropy

# benchmark-spec §2, Table 2: (hidden, intermediate, layers, heads, non-embedding N).
PAPER_TABLE = {
    "130m": (512, 2048, 32, 8, 134_217_728),
    "300m": (768, 3072, 32, 12, 301_989_888),
    "520m": (1024, 4096, 32, 16, 536_870_912),
    "1.2b": (1536, 6144, 32, 24, 1_207_959_552),
}


@pytest.mark.parametrize("name", sorted(PAPER_TABLE))
def test_paper_sizes_match_the_spec_table(name):
    hidden, inter, layers, heads, n = PAPER_TABLE[name]
    cfg = MODEL_CONFIGS[name]
    assert (cfg.dim, cfg.intermediate, cfg.n_layers, cfg.n_heads) == (hidden, inter, layers, heads)
    assert cfg.head_dim == 64 and cfg.vocab_size == 128256 and cfg.seq_len == 4096
    assert n == 512 * hidden ** 2
    assert non_embedding_params(cfg) == n
    with torch.device("meta"):  # count the real module's parameters without allocating them
        model = Llama(cfg)
    counted = sum(p.numel() for full_name, p in model.named_parameters()
                  if full_name.endswith("_proj.weight"))
    assert counted == n
    total = sum(p.numel() for p in model.parameters())
    norms = (2 * layers + 1) * hidden
    assert total == n + 2 * 128256 * hidden + norms


def test_module_names_follow_the_routing_contract():
    cfg = dataclasses.replace(MODEL_CONFIGS["tiny"], vocab_size=50)
    model = Llama(cfg)
    modules = dict(model.named_modules())
    assert isinstance(modules["embed_tokens"], torch.nn.Embedding)
    assert isinstance(modules["lm_head"], torch.nn.Linear) and modules["lm_head"].bias is None
    assert modules["lm_head"].weight is not modules["embed_tokens"].weight
    assert isinstance(modules["norm"], torch.nn.RMSNorm)
    for i in range(cfg.n_layers):
        attn = modules[f"layers.{i}.attn"]
        assert (attn.n_heads, attn.head_dim) == (cfg.n_heads, cfg.dim // cfg.n_heads)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = modules[f"layers.{i}.attn.{proj}"]
            assert lin.bias is None and lin.weight.shape == (cfg.dim, cfg.dim)
        shapes = {"gate_proj": (cfg.intermediate, cfg.dim), "up_proj": (cfg.intermediate, cfg.dim),
                  "down_proj": (cfg.dim, cfg.intermediate)}
        for proj, shape in shapes.items():
            lin = modules[f"layers.{i}.mlp.{proj}"]
            assert lin.bias is None and lin.weight.shape == shape
        for norm in ("attn_norm", "mlp_norm"):
            assert isinstance(modules[f"layers.{i}.{norm}"], torch.nn.RMSNorm)
            assert modules[f"layers.{i}.{norm}"].eps == 1e-5


def test_init_std_is_0_02_and_norms_start_at_one():
    torch.manual_seed(0)
    cfg = dataclasses.replace(MODEL_CONFIGS["tiny2"], vocab_size=1000)
    model = Llama(cfg)
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            # std of n >= 16k normal samples is within 4% of 0.02 with overwhelming probability
            assert abs(p.std().item() - 0.02) < 0.02 * 0.04, name
            assert abs(p.mean().item()) < 0.02 * 0.04, name


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="model='nope'"):
        get_model_config("nope")


def reference_forward(model, tokens):
    """The spec's Llama in float64, written independently: complex-number RoPE, explicit masked softmax."""
    cfg = model.cfg
    w = {k: v.detach().double() for k, v in model.state_dict().items()}
    batch, seq = tokens.shape
    hd, half = cfg.head_dim, cfg.head_dim // 2

    def rmsnorm(x, g):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * g

    freqs = cfg.rope_theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / hd)
    rot = torch.polar(torch.ones(seq, half, dtype=torch.float64),
                      torch.arange(seq, dtype=torch.float64)[:, None] * freqs[None, :])

    def rope(x):  # x: (batch, heads, seq, hd); pair element i with element i + hd/2
        z = torch.complex(x[..., :half], x[..., half:]) * rot
        return torch.cat([z.real, z.imag], dim=-1)

    mask = torch.full((seq, seq), -math.inf, dtype=torch.float64).triu(1)
    x = w["embed_tokens.weight"][tokens]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        h = rmsnorm(x, w[p + "attn_norm.weight"])
        q, k, v = (
            (h @ w[p + f"attn.{n}.weight"].T).view(batch, seq, cfg.n_heads, hd).transpose(1, 2)
            for n in ("q_proj", "k_proj", "v_proj"))
        scores = rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(hd) + mask
        att = torch.softmax(scores, dim=-1) @ v
        x = x + att.transpose(1, 2).reshape(batch, seq, cfg.dim) @ w[p + "attn.o_proj.weight"].T
        h = rmsnorm(x, w[p + "mlp_norm.weight"])
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    return rmsnorm(x, w["norm.weight"]) @ w["lm_head.weight"].T


def test_forward_matches_float64_reference_and_loss_is_cross_entropy():
    torch.manual_seed(1)
    cfg = dataclasses.replace(MODEL_CONFIGS["tiny"], vocab_size=97)
    model = Llama(cfg)
    # larger weights than the 0.02 init so attention and RoPE actually shape the output
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
            else:
                p.uniform_(0.5, 1.5)
    tokens = torch.randint(0, cfg.vocab_size, (3, 17))
    targets = torch.randint(0, cfg.vocab_size, (3, 17))
    logits = model(tokens)
    ref = reference_forward(model, tokens)
    torch.testing.assert_close(logits.double(), ref, rtol=1e-4, atol=1e-4)
    logp = torch.log_softmax(ref, dim=-1)
    ref_loss = -logp.gather(-1, targets[..., None]).mean()
    for double_backward in (False, True):  # the chunked loss and the plain one
        loss = model(tokens, targets, double_backward=double_backward)
        assert loss.dtype == torch.float32 and abs(loss.item() - ref_loss.item()) < 1e-4


def test_attention_is_causal():
    torch.manual_seed(2)
    model = Llama(dataclasses.replace(MODEL_CONFIGS["tiny"], vocab_size=64))
    tokens = torch.randint(0, 64, (2, 12))
    changed = tokens.clone()
    changed[:, 7:] = torch.randint(0, 64, (2, 5))
    a = model(tokens)
    b = model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("chunk_rows", [1, 7, None])
def test_linear_cross_entropy_matches_cross_entropy_in_float64(rng, chunk_rows):
    """Values and both gradients against F.cross_entropy on the full logits, float64, random sizes and inputs;
    chunks of 1 row, of 7 (not dividing the rows) and the default (one chunk here)."""
    rows, dim, vocab = (int(torch.randint(lo, hi, (), generator=rng)) for lo, hi in ((20, 60), (3, 17), (5, 90)))
    hidden = torch.randn(rows, dim, dtype=torch.float64, generator=rng, requires_grad=True)
    weight = (2 * torch.randn(vocab, dim, dtype=torch.float64, generator=rng)).requires_grad_()
    targets = torch.randint(vocab, (rows,), generator=rng)
    upstream = torch.rand((), dtype=torch.float64, generator=rng) + 0.5  # a loss scale, as 1/grad_accum is
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows)
    grads = torch.autograd.grad(loss * upstream, (hidden, weight))
    reference = F.cross_entropy(hidden @ weight.T, targets)
    expected = torch.autograd.grad(reference * upstream, (hidden, weight), retain_graph=True)
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, chunk_rows), reference)
    # Only the weight wants a gradient (a frozen trunk): the same weight gradient.
    only_weight = torch.autograd.grad(linear_cross_entropy(hidden.detach(), weight, targets, chunk_rows), weight)[0]
    torch.testing.assert_close(only_weight, torch.autograd.grad(reference, weight)[0], rtol=1e-10, atol=1e-12)


def test_linear_cross_entropy_never_holds_the_full_logits(monkeypatch):
    """Every matmul it makes is one chunk of rows high: the (N, V) logits never exist, in forward or backward."""
    rows, dim, vocab, chunk = 64, 8, 1000, 16
    heights = []
    real = torch.Tensor.__matmul__

    def matmul(a, b):
        out = real(a, b)
        heights.append(out.shape)
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", matmul)
    hidden = torch.randn(rows, dim, requires_grad=True)
    weight = torch.randn(vocab, dim, requires_grad=True)
    linear_cross_entropy(hidden, weight, torch.randint(vocab, (rows,)), chunk_rows=chunk).backward()
    assert heights and all(shape[0] * shape[1] <= chunk * vocab for shape in heights)
    assert (rows, vocab) not in heights


def test_linear_cross_entropy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"hidden \(4, 3\), weight \(5, 2\)"):
        linear_cross_entropy(torch.zeros(4, 3), torch.zeros(5, 2), torch.zeros(4, dtype=torch.long))
