"""What every elementwise optimizer op must do the same way: pass opcheck, run on FakeTensors through its fake,
compile fullgraph to the same result as eager, and refuse bad input with an error naming the argument while writing
nothing (the rules live in C++ only; the fakes compute output shapes). The numerics of each family are tested against
float64 references in tests/test_ops_<family>.py."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastoptim.ops  # noqa: F401  (loads the library and registers the fakes)
from elementwise_cases import ALL_OPS, COUNT_OPS, NORM_OPS, SHAPES, UPDATE_OPS, build, tensor_lists


def op_of(name):
    return getattr(torch.ops.fastoptim, name).default


def arg_names(name):
    return [a.name for a in op_of(name)._schema.arguments]


def snapshot(args):
    return [[t.clone() for t in tensors] for _, tensors in tensor_lists(args)]


def assert_unchanged(args, before):
    for (_, tensors), saved in zip(tensor_lists(args), before):
        for t, s in zip(tensors, saved):
            assert torch.equal(t, s)


@pytest.mark.parametrize("name", ALL_OPS)
def test_opcheck(device, rng, name):
    torch.library.opcheck(op_of(name), build(name, device, rng))


@pytest.mark.parametrize("name", ALL_OPS)
def test_fake_tensor_mode_runs_the_fake(rng, name):
    real = build(name, "cpu", rng)
    with FakeTensorMode() as mode:
        fake = tuple(
            [mode.from_tensor(t) for t in a] if isinstance(a, list) else mode.from_tensor(a)
            if isinstance(a, torch.Tensor) else a
            for a in real
        )
        out = op_of(name)(*fake)
    if name in NORM_OPS:
        assert out.shape == () and out.dtype == torch.float32
    elif name in COUNT_OPS:
        assert out.shape == (len(SHAPES),) and out.dtype == torch.int64
    else:
        assert out is None


@pytest.mark.parametrize("name", ALL_OPS)
def test_compiles_fullgraph_and_matches_eager(device, rng, name):
    torch._dynamo.reset()  # one `call` code object serves every op: start each from a clean compile cache
    args = build(name, device, rng)
    eager = tuple([t.clone() for t in a] if isinstance(a, list) else a for a in args)

    def call(*call_args):
        return op_of(name)(*call_args)

    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    for _ in range(2):  # the second call reuses the graph; state advanced in place must match too
        out_compiled, out_eager = compiled(*args), call(*eager)
    if name in NORM_OPS + COUNT_OPS:
        torch.testing.assert_close(out_compiled, out_eager)
    for (_, got), (_, want) in zip(tensor_lists(args), tensor_lists(eager)):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


def non_contiguous(t):
    spread = torch.zeros(2 * t.numel(), dtype=t.dtype, device=t.device)[::2]
    spread.copy_(t.reshape(-1))
    return spread.view(t.shape)


BAD_LIST_CASES = [(name, corruption) for name in ALL_OPS for corruption in ("non_contiguous", "float64", "shorter")
                  if (name, corruption) != ("clip_scale", "shorter")]  # clip_scale has one list: no length to miss


@pytest.mark.parametrize("name, corruption", BAD_LIST_CASES)
def test_bad_list_names_the_argument_and_writes_nothing(rng, name, corruption):
    names = arg_names(name)
    for position, _ in tensor_lists(build(name, "cpu", rng)):
        if corruption == "shorter" and position == 0:
            continue  # the first list sets the length the others are held to
        args = list(build(name, "cpu", rng))
        if corruption == "non_contiguous" and args[position][0].dim() == 0:
            continue  # a list of 0-dim step counters: a 0-dim tensor is always contiguous
        if corruption == "non_contiguous":
            args[position] = [non_contiguous(args[position][0]), *args[position][1:]]
            message = rf"{names[position]}\[0\] is not contiguous"
        elif corruption == "float64":
            args[position] = [t.double() for t in args[position]]
            message = rf"{names[position]}(\[\d+\])? has dtype torch.float64"
        else:
            args[position] = args[position][:1]
            message = rf"{names[position]} has 1 tensors but"
        before = snapshot(args)
        with pytest.raises(RuntimeError, match=message):
            op_of(name)(*args)
        assert_unchanged(args, before)


@pytest.mark.parametrize("name", [n for n in UPDATE_OPS + COUNT_OPS if n != "sophia_hessian_"])
def test_bad_scalar_names_it_and_writes_nothing(rng, name):
    args = list(build(name, "cpu", rng))
    position = arg_names(name).index("grad_scale")
    args[position] = torch.tensor([0.5, 0.5])
    before = snapshot(args)
    with pytest.raises(RuntimeError, match="grad_scale must be a 0-dim float32 tensor"):
        op_of(name)(*args)
    assert_unchanged(args, before)


def test_state_in_another_dtype_than_float32_or_params_is_refused(rng):
    args = list(build("adamw_", "cpu", rng, dtype=torch.bfloat16, state_dtype=torch.float16))
    with pytest.raises(RuntimeError, match="exp_avgs has dtype torch.float16; optimizer state must be float32 or"):
        op_of("adamw_")(*args)


# sophia_hessian_ takes lists only: with all of them empty the dispatcher has no device to go by, so its functional
# entry returns before calling it; the others still have their lr on a device.
@pytest.mark.parametrize("name", [n for n in UPDATE_OPS + COUNT_OPS if n != "sophia_hessian_"])
def test_empty_lists_do_nothing(name):
    args = list(build(name, "cpu", torch.Generator()))
    for position, _ in tensor_lists(args):
        args[position] = []
    out = op_of(name)(*args)
    assert out is None if name in UPDATE_OPS else out.shape == (0,)


@pytest.mark.cuda
@pytest.mark.parametrize("name", UPDATE_OPS)
def test_mixed_devices_refused(rng, name):
    args = list(build(name, "cpu", rng))
    args[1] = [args[1][0], args[1][1].cuda()]
    with pytest.raises(RuntimeError, match=rf"{arg_names(name)[1]}\[1\] is on cuda"):
        op_of(name)(*args)


@pytest.mark.parametrize("name", ALL_OPS)
def test_sparse_tensors_are_refused_by_name(rng, name):
    # Sparse tensors dispatch to the ops' sparse kernel, which only names the argument and refuses it.
    args = list(build(name, "cpu", rng))
    position, tensors = tensor_lists(args)[-1]
    dense = [[t.clone() for t in ts] for i, ts in tensor_lists(args) if i != position]
    args[position] = [tensors[0].to_sparse(), *tensors[1:]]
    with pytest.raises(RuntimeError, match=rf"{arg_names(name)[position]}\[0\] is sparse; only dense tensors"):
        op_of(name)(*args)
    for ts, saved in zip([ts for i, ts in tensor_lists(args) if i != position], dense):
        assert all(torch.equal(t, s) for t, s in zip(ts, saved))
