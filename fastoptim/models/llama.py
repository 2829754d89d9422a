"""The Llama-2-style decoder the benchmark trains (benchmark-spec §2), written to be read in one sitting.

Pre-norm RMSNorm (eps 1e-5), SwiGLU MLP, rotary position embeddings (theta 10000), full multi-head attention
(kv_heads = heads) through scaled_dot_product_attention, no biases, untied input/output embeddings, every weight
initialised N(0, 0.02). The loss goes through a chunked linear cross-entropy (cross_entropy.py). Module names are a
contract with fastoptim/optim/routing.py (see TEAM.md): do not rename.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastoptim.models.cross_entropy import linear_cross_entropy


@dataclass(frozen=True)
class LlamaConfig:
    dim: int
    n_layers: int
    n_heads: int
    intermediate: int
    # None: the vocabulary follows the tokenizer of the data in use (tiny configs). The paper presets keep Llama-3's.
    vocab_size: int | None = None
    seq_len: int = 4096  # the preset's training sequence length; RoPE itself has no maximum
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")


LLAMA3_VOCAB = 128256

MODEL_CONFIGS: dict[str, LlamaConfig] = {
    # benchmark-spec §2, Table 2: head_dim 64, d_ff = 4d, 32 layers, Llama-3 vocabulary, seq len 4096.
    "130m": LlamaConfig(dim=512, n_layers=32, n_heads=8, intermediate=2048, vocab_size=LLAMA3_VOCAB),
    "300m": LlamaConfig(dim=768, n_layers=32, n_heads=12, intermediate=3072, vocab_size=LLAMA3_VOCAB),
    "520m": LlamaConfig(dim=1024, n_layers=32, n_heads=16, intermediate=4096, vocab_size=LLAMA3_VOCAB),
    "1.2b": LlamaConfig(dim=1536, n_layers=32, n_heads=24, intermediate=6144, vocab_size=LLAMA3_VOCAB),
    # CPU sizes for tests and examples: seconds to minutes on two cores.
    "tiny": LlamaConfig(dim=64, n_layers=2, n_heads=2, intermediate=256, seq_len=128),
    "tiny2": LlamaConfig(dim=128, n_layers=4, n_heads=4, intermediate=512, seq_len=256),
}


def get_model_config(name: str) -> LlamaConfig:
    if name not in MODEL_CONFIGS:
        raise ValueError(f"model={name!r} is not a known model; choose one of {sorted(MODEL_CONFIGS)}")
    return MODEL_CONFIGS[name]


def non_embedding_params(cfg: LlamaConfig) -> int:
    """N of the Chinchilla budget: the attention and MLP matrices, L·(4d² + 3·d·d_ff) = 512·d² for the paper sizes.

    Like the paper, N leaves out the embeddings, the output head and the (tiny) RMSNorm gains.
    """
    return cfg.n_layers * (4 * cfg.dim * cfg.dim + 3 * cfg.dim * cfg.intermediate)


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout: the two halves share frequencies
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin):
        batch, seq, dim = x.shape
        q, k, v = (proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(batch, seq, dim))


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.intermediate, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.intermediate, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("LlamaConfig.vocab_size is None: set it to the tokenizer's vocabulary size "
                             "(dataclasses.replace(cfg, vocab_size=...)) before building the model")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *, double_backward: bool = False):
        """tokens, targets: (batch, seq) int64. Without targets: the logits (batch, seq, vocab). With targets: the
        mean cross-entropy over all target tokens, in float32 even under bf16 autocast (the loss is the benchmark's
        metric), through the chunked linear cross-entropy that never holds the full float32 logits; with
        double_backward=True through F.cross_entropy on the whole logits, which autograd can differentiate twice
        (Sophia's Hessian-vector product)."""
        cos, sin = rotary_cos_sin(tokens.shape[1], self.cfg.head_dim, self.cfg.rope_theta, tokens.device)
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        hidden = self.norm(x)
        if targets is None:
            return self.lm_head(hidden)
        if double_backward:
            return F.cross_entropy(self.lm_head(hidden).float().flatten(0, 1), targets.flatten())
        return linear_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, targets.flatten())
