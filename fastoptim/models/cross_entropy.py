"""Mean cross-entropy of a linear output layer, computed in row chunks so the full float32 logits never exist.

At Llama-3's vocabulary (128,256) one 4096-token sequence has 525 M logits: 1 GB in bf16, 2 GB more as a float32
copy and 2 GB for its log-softmax. Here the rows go through in chunks of about CHUNK_ELEMENTS logits; each chunk's
float32 logits become its loss and, when gradients are wanted, at once its gradients (softmax − one-hot, scaled by
1/N), multiplied back into the gradients of the hidden states and the weight; then the chunk is freed. The backward
only scales those stored gradients by the incoming one, so the step costs three matmuls of the head, as autograd's
would, and its memory is one chunk of logits plus the two gradients.

Precision follows autocast as the plain `F.cross_entropy(linear(h).float(), t)` does: the matmuls take the autocast
dtype (bf16 on CUDA) where autocast is on, the logits and softmax are float32 (float64 for float64 inputs).
The gradients are computed in the forward, so this function cannot be differentiated twice (Sophia's Hessian-vector
product takes the plain path, see Llama.forward).
"""

import torch

CHUNK_ELEMENTS = 1 << 26  # logits per chunk: 256 MB in float32


def _loss_and_grads(hidden, weight, targets, chunk_rows, want_hidden: bool, want_weight: bool):
    """(mean loss, its gradient for hidden or None, for weight or None), chunk by chunk."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device.type
    matmul = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    softmax = torch.promote_types(hidden.dtype, torch.float32)
    step = chunk_rows or max(1, CHUNK_ELEMENTS // vocab)
    with torch.autocast(device, enabled=False):
        w = weight.to(matmul)
        total = torch.zeros((), dtype=softmax, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=softmax, device=weight.device) if want_weight else None
        for start in range(0, rows, step):
            h = hidden[start:start + step].to(matmul)
            target = targets[start:start + step]
            logits = (h @ w.T).to(softmax)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, target[:, None]).squeeze(1)).sum()
            if not (want_hidden or want_weight):
                continue
            # d(mean loss)/d(logits) = (softmax − one-hot) / rows, built in the logits' buffer.
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(target.shape[0], device=grad.device), target] -= 1
            grad = grad.div_(rows).to(matmul)
            if want_hidden:
                grad_hidden[start:start + step] = grad @ w
            if want_weight:
                grad_weight += (grad.T @ h).to(softmax)
    return total / rows, grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):
        loss, grad_hidden, grad_weight = _loss_and_grads(hidden, weight, targets, chunk_rows,
                                                         *ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * grad_loss).to(ctx.weight_dtype), None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """mean_i CE(hidden_i · weightᵀ, targets_i) for hidden (N, d), weight (V, d), targets (N,) int64, without the
    (N, V) logits; `chunk_rows` overrides the chunk height (default: CHUNK_ELEMENTS // V rows)."""
    if hidden.ndim != 2 or weight.ndim != 2 or targets.shape != hidden.shape[:1] or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and "
                         f"targets {tuple(targets.shape)} must be (N, d), (V, d) and (N,)")
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows)
    return _loss_and_grads(hidden, weight, targets, chunk_rows, False, False)[0]
