"""adamw_ (AdamW, NAdamW), cautious_adamw_ and mars_adamw_ against float64 references written from
benchmark-spec §1.1–§1.4, on random shapes (odd sizes, empty, several chunks), mixed dtypes, and lists long enough
to need several CUDA launches."""

import math

import pytest
import torch

import fastoptim.ops  # noqa: F401  (loads the native library)

from elementwise_cases import scalar, step_counters

fastoptim_ops = torch.ops.fastoptim

# Odd sizes, an empty tensor, and one spanning several 65536-element chunks.
SHAPES = [(1,), (7, 3), (0,), (33, 65), (3 * 65536 + 5,)]
# (param dtype, state dtype): float32 throughout, low-precision params with float32 state, state in the params' dtype.
DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
]
# Math is float32: a parameter or state element is off by its own dtype's rounding plus float32 error in u.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make_state(shapes, param_dtype, state_dtype, device, rng, lists=("exp_avgs", "exp_avg_sqs")):
    params = [torch.randn(s, generator=rng).to(device, param_dtype) for s in shapes]
    grads = [torch.randn(s, generator=rng).to(device, param_dtype) for s in shapes]
    state = {
        name: [(torch.rand if name == "exp_avg_sqs" else torch.randn)(s, generator=rng).to(device, state_dtype)
               for s in shapes]
        for name in lists
    }
    return params, grads, state


def adam_reference(p, g, m, v, *, lr, t, beta1, beta2, eps, wd, nesterov=False, cautious=False):
    """One step in float64, from the spec: returns (p, m, v) after it."""
    p, g, m, v = p.double(), g.double(), m.double(), v.double()
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    denominator = (v / (1 - beta2**t)).sqrt() + eps
    if nesterov:
        numerator = beta1 * m / (1 - beta1 ** (t + 1)) + (1 - beta1) * g / (1 - beta1**t)
    else:
        numerator = m / (1 - beta1**t)
    u = numerator / denominator
    if cautious:
        mask = (u * g > 0).double()
        mean = mask.mean() if mask.numel() else torch.tensor(0.0, dtype=torch.float64)
        u = u * mask / (mean + eps)
    return p - lr * (u + wd * p), m, v


def assert_close(got, want, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def check(params, state_lists, expected):
    for i, (p, *state) in enumerate(zip(params, *state_lists)):
        for got, want in zip([p, *state], expected[i]):
            assert_close(got, want, got.dtype)


@pytest.mark.parametrize("param_dtype, state_dtype", DTYPES)
@pytest.mark.parametrize("variant", ["adamw", "nadamw", "cautious"])
def test_matches_float64_reference(device, rng, param_dtype, state_dtype, variant):
    params, grads, state = make_state(SHAPES, param_dtype, state_dtype, device, rng)
    m, v = state["exp_avgs"], state["exp_avg_sqs"]
    counts = torch.randint(1, 50, (len(SHAPES),), generator=rng).tolist()  # each parameter at its own step count
    hp = dict(lr=0.01 + 0.05 * torch.rand((), generator=rng).item(), beta1=0.9, beta2=0.98, eps=1e-8, wd=0.1)
    grad_scale = 0.25 + torch.rand((), generator=rng).item()
    expected = [
        adam_reference(p, g.double() * float(torch.tensor(grad_scale, dtype=torch.float32)), mi, vi, t=t,
                       nesterov=variant == "nadamw", cautious=variant == "cautious", **hp)
        for p, g, mi, vi, t in zip(params, grads, m, v, counts)
    ]
    op = fastoptim_ops.cautious_adamw_ if variant == "cautious" else fastoptim_ops.adamw_
    op(params, grads, m, v, scalar(hp["lr"], device), step_counters(counts, device), hp["beta1"], hp["beta2"],
       hp["eps"], hp["wd"], variant == "nadamw", scalar(grad_scale, device))
    check(params, [m, v], expected)


def mars_reference(p, g, prev, m, v, *, gamma, scale, **hp):
    c = g.double() + gamma * hp["beta1"] / (1 - hp["beta1"]) * (g.double() - prev.double())
    return (*adam_reference(p, c * scale, m, v, **hp), g.double())


@pytest.mark.parametrize("param_dtype, state_dtype", DTYPES)
def test_mars_matches_float64_reference(device, rng, param_dtype, state_dtype):
    params, grads, state = make_state(SHAPES, param_dtype, state_dtype, device, rng,
                                      lists=("prev_grads", "exp_avgs", "exp_avg_sqs"))
    prev, m, v = state["prev_grads"], state["exp_avgs"], state["exp_avg_sqs"]
    hp = dict(lr=0.02, t=4, beta1=0.95, beta2=0.99, eps=1e-8, wd=0.1)
    gamma, max_norm = 0.025, 5.0
    corrected = [g.double() + gamma * hp["beta1"] / (1 - hp["beta1"]) * (g.double() - q.double())
                 for g, q in zip(grads, prev)]
    norm = math.sqrt(sum(float(c.square().sum()) for c in corrected))
    scale = min(1.0, max_norm / norm)
    expected = [mars_reference(p, g, q, mi, vi, gamma=gamma, scale=scale, **hp)
                for p, g, q, mi, vi in zip(params, grads, prev, m, v)]
    factor = fastoptim_ops.mars_clip_scale(grads, prev, gamma, hp["beta1"], max_norm)
    torch.testing.assert_close(factor.double().cpu(), torch.tensor(scale, dtype=torch.float64), rtol=1e-5, atol=0)
    fastoptim_ops.mars_adamw_(params, grads, prev, m, v, scalar(hp["lr"], device),
                              step_counters([hp["t"]] * len(params), device),
                              hp["beta1"], hp["beta2"], hp["eps"], hp["wd"], gamma, factor)
    expected_in_op_order = [(p, q, mi, vi) for p, mi, vi, q in expected]
    check(params, [prev, m, v], expected_in_op_order)


def test_cautious_mask_mean_is_per_tensor(device):
    # Tensor 0: u·g > 0 on 1 of 4 elements, tensor 1 on all 3. With m = v = 0 and t = 1, u = g/(|g| + ε) = sign(g)
    # when g ≠ 0, so the mask is 1 where g ≠ 0 and the mean is the fraction of nonzero gradients per tensor.
    params = [torch.zeros(4, device=device), torch.zeros(3, device=device)]
    grads = [torch.tensor([2.0, 0.0, 0.0, 0.0], device=device), torch.tensor([1.0, -1.0, 3.0], device=device)]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    fastoptim_ops.cautious_adamw_(params, grads, m, v, scalar(1.0, device), step_counters([1, 1], device), 0.9, 0.99,
                                  1e-12, 0.0,
                                  False, None)
    torch.testing.assert_close(params[0].cpu(), torch.tensor([-4.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(params[1].cpu(), torch.tensor([-1.0, 1.0, -1.0]))


def test_many_tensors_span_several_launches(device, rng):
    # More tensors than one CUDA launch's metadata holds at depth 4 (36), with random small sizes.
    shapes = [(int(torch.randint(1, 300, (), generator=rng)),) for _ in range(100)]
    params, grads, state = make_state(shapes, torch.float32, torch.float32, device, rng)
    m, v = state["exp_avgs"], state["exp_avg_sqs"]
    hp = dict(lr=0.05, t=2, beta1=0.9, beta2=0.95, eps=1e-8, wd=0.2)
    expected = [adam_reference(*a, cautious=True, **hp) for a in zip(params, grads, m, v)]
    fastoptim_ops.cautious_adamw_(params, grads, m, v, scalar(0.05, device),
                                  step_counters([2] * len(params), device), 0.9, 0.95, 1e-8, 0.2,
                                  False, None)
    check(params, [m, v], expected)


def test_several_steps_track_the_reference(device, rng):
    params, _, state = make_state([(129, 7)], torch.float32, torch.float32, device, rng)
    m, v = [torch.zeros_like(params[0])], [torch.zeros_like(params[0])]
    ref = (params[0].double(), m[0].double(), v[0].double())
    lr = torch.tensor(0.0, device=device)  # a device lr changed between steps, as a scheduler does
    for t in range(1, 6):
        grad = torch.randn(params[0].shape, generator=rng).to(device)
        lr.fill_(0.01 * t)
        fastoptim_ops.adamw_(params, [grad], m, v, lr, step_counters([t], device), 0.9, 0.98, 1e-20, 0.1, False,
                             None)
        ref = adam_reference(*ref[:1], grad, *ref[1:], lr=0.01 * t, t=t, beta1=0.9, beta2=0.98, eps=1e-20, wd=0.1)
    for got, want in zip((params[0], m[0], v[0]), ref):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# ---- Cautious on row shards: the count pass alone, and the update with the whole tensor's mean ------------------
@pytest.mark.parametrize("param_dtype, state_dtype", DTYPES)
@pytest.mark.parametrize("nesterov", [False, True])
def test_cautious_mask_counts_match_float64_reference(device, rng, param_dtype, state_dtype, nesterov):
    """Per tensor, how many elements have u·g > 0 (u's sign is its numerator's), written nowhere. float32 may put an
    element whose float64 numerator is within 1e-5 of cancelling on either side: the count lies between the sure
    agreements and the sure-or-ambiguous ones."""
    params, grads, state = make_state(SHAPES, param_dtype, state_dtype, device, rng)
    m, v = state["exp_avgs"], state["exp_avg_sqs"]
    counts = torch.randint(1, 50, (len(SHAPES),), generator=rng).tolist()
    beta1, scale = 0.9, 0.25 + torch.rand((), generator=rng).item()
    before = [t.clone() for t in params + m + v]
    got = fastoptim_ops.cautious_mask_counts(params, grads, m, v, scalar(0.01, device), step_counters(counts, device),
                                             beta1, 0.98, 1e-8, 0.1, nesterov, scalar(scale, device))
    assert got.dtype == torch.int64 and got.device.type == torch.device(device).type
    assert all(torch.equal(a, b) for a, b in zip(params + m + v, before))
    scale = float(torch.tensor(scale, dtype=torch.float32))
    for count, g, mi, t in zip(got.tolist(), grads, m, counts):
        g, mi = g.double() * scale, mi.double()
        decayed, fresh = beta1 * mi, (1 - beta1) * g
        if nesterov:
            decayed, fresh = beta1 * (decayed + fresh) / (1 - beta1 ** (t + 1)), fresh / (1 - beta1**t)
        numerator = decayed + fresh
        ambiguous = numerator.abs() <= 1e-5 * (decayed.abs() + fresh.abs())
        agrees = numerator * g > 0
        assert int((agrees & ~ambiguous).sum()) <= count <= int((agrees | ambiguous).sum())


@pytest.mark.parametrize("param_dtype, state_dtype", DTYPES)
def test_cautious_in_row_shards_with_summed_counts_equals_the_whole_step(device, rng, param_dtype, state_dtype):
    """What ZeRO-1 and FSDP2 do: each tensor cut by rows into parts stepped by separate calls, each with the mean
    of its whole tensor from the parts' summed counts, gives the whole tensor's step bit for bit."""
    shapes = [(7, 3), (33, 65), (3 * 65536 + 5,)]
    params, grads, state = make_state(shapes, param_dtype, state_dtype, device, rng)
    whole = [params, grads, state["exp_avgs"], state["exp_avg_sqs"]]
    cuts = [lambda t: t[:t.shape[0] // 3], lambda t: t[t.shape[0] // 3:]]
    parts = [[[cut(t).clone() for t in tensors] for tensors in whole] for cut in cuts]  # [part][list][tensor]
    steps = [3, 7, 20]
    call = (scalar(0.03, device), 0.9, 0.98, 1e-8, 0.1, True, scalar(0.5, device))

    def run(op, lists, *extra):
        lr, beta1, beta2, eps, wd, nesterov, gs = call
        return op(*lists, lr, step_counters(steps, device), beta1, beta2, eps, wd, nesterov, gs, *extra)

    counts = sum(run(fastoptim_ops.cautious_mask_counts, lists) for lists in parts)
    means = (counts.double() / torch.tensor([math.prod(s) for s in shapes], dtype=torch.float64,
                                            device=counts.device)).float()
    for lists in parts:
        run(fastoptim_ops.cautious_adamw_, lists, means)
    run(fastoptim_ops.cautious_adamw_, whole)
    for k, tensors in enumerate(whole):
        for i, t in enumerate(tensors):
            assert torch.equal(torch.cat([parts[0][k][i], parts[1][k][i]]), t), (k, i)


@pytest.mark.parametrize(
    "means, message",
    [
        (lambda device: torch.full((2,), 0.5, dtype=torch.float64, device=device), "got dtype torch.float64"),
        (lambda device: torch.full((3,), 0.5, device=device), r"one value per tensor \(2\)"),
        (lambda device: torch.full((2, 1), 0.5, device=device), r"shape \[2, 1\]"),
    ],
)
def test_cautious_mask_means_refused_by_name_writing_nothing(rng, means, message):
    from elementwise_cases import build

    args = build("cautious_adamw_", "cpu", rng)
    before = [t.clone() for a in args if isinstance(a, list) for t in a]
    with pytest.raises(RuntimeError, match="mask_means must be a float32 vector.*" + message):
        fastoptim_ops.cautious_adamw_(*args, means("cpu"))
    assert all(torch.equal(a, b) for a, b in zip([t for a in args if isinstance(a, list) for t in a], before))


def test_cautious_with_mask_means_passes_opcheck(device, rng):
    from elementwise_cases import build

    torch.library.opcheck(fastoptim_ops.cautious_adamw_.default,
                          (*build("cautious_adamw_", device, rng), torch.tensor([0.25, 0.75], device=device)))


@pytest.mark.parametrize("nesterov", [False, True])
def test_pure_cautious_with_whole_mask_means_counts_and_steps_as_the_native_path(rng, nesterov):
    """The functional entry on one row shard of each tensor, through the native op and through pure torch: each hands
    whole_mask_means the same counts, and steps alike given the rest's counts. |m| ≥ 1 against |g| ≤ 5 with β1 =
    0.9 keeps every numerator's sign that of m (no element is near cancelling), while u·g > 0 on about half."""
    from fastoptim.optim.functional.adam import adam_

    shapes = [(33, 65), (7, 3), (2 * 65536 + 9,)]
    grads = [torch.randn(s, generator=rng).clamp(-5, 5) for s in shapes]
    m = [torch.randn(s, generator=rng).sign() * (1 + torch.rand(s, generator=rng)) for s in shapes]
    v = [torch.rand(s, generator=rng) for s in shapes]
    params = [torch.randn(s, generator=rng) for s in shapes]
    whole, t = [params, grads, m, v], 4
    first = [[x[:x.shape[0] // 3].clone() for x in tensors] for tensors in whole]
    rest = [[x[x.shape[0] // 3:].clone() for x in tensors] for tensors in whole]
    hyper = dict(lr=0.03, beta1=0.9, beta2=0.98, eps=1e-8, weight_decay=0.1, grad_scale=None, nesterov=nesterov,
                 cautious=True)
    rest_counts = fastoptim_ops.cautious_mask_counts(*rest, scalar(0.03, "cpu"), step_counters([t + 1] * 3, "cpu"),
                                                     0.9, 0.98, 1e-8, 0.1, nesterov, None)
    sizes = torch.tensor([math.prod(s) for s in shapes], dtype=torch.float64)
    seen, stepped = {}, {}
    for fused in (True, False):
        lists = [[x.clone() for x in tensors] for tensors in first]

        def means(counts, fused=fused):
            seen[fused] = counts.clone()
            return ((counts + rest_counts).double() / sizes).float()

        adam_(*lists, step_counters([t] * 3, "cpu"), whole_mask_means=means, fused=fused, **hyper)
        stepped[fused] = lists
    assert torch.equal(seen[True], seen[False]) and 0 < int(seen[True][0]) < first[0][0].numel()
    for native, pure in zip(stepped[True], stepped[False]):
        for a, b in zip(native, pure):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
