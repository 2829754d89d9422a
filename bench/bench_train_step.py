"""One training step as the trainer takes it (bf16 autocast on CUDA, forward with the chunked linear cross-entropy,
backward, AdamW step, zero_grad) on the `tiny` model at sequence 128 on CPU and on `130m` at sequence 4096 on CUDA,
eager against compiled (torch.compile of each transformer block, the trainer's --compile).

The work is the step's model FLOPs as the trainer counts them for MFU (fastoptim/train/throughput.py: 6·(N + V·d)
per token plus attention), so `ratio` is the step's time over an in-run matmul of the same FLOPs and `floor_pct` its
share of that matmul rate. extra_info adds tokens_per_s, mfu (against the GPU's bf16 dense peak; None on CPU) and,
on CUDA, peak_memory_bytes. One micro-batch per step: the `130m` step is the presets' micro-batch of 16 sequences
(65,536 tokens), the `tiny` step the tiny preset's batch of 16.
"""

import dataclasses
import types

import pytest
import torch

# The trainer and the grid's presets are extras: a plain install with only the bench extra skips this module.
for _module in ("tqdm", "tokenizers", "scipy"):
    pytest.importorskip(_module, reason="the train-step benchmark needs pip install 'fastoptim[grid]'")

from fastoptim.grid.presets import MICRO_BATCH  # noqa: E402
from fastoptim.models import Llama, get_model_config  # noqa: E402
from fastoptim.train.throughput import device_peak_flops, train_flops_per_token  # noqa: E402

SETUPS = {"cpu": ("tiny", 4096, 128, 16), "cuda": ("130m", 128_256, 4096, MICRO_BATCH["130m"])}


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_train_step(measure, benchmark, bench_device, mode):
    from fastoptim.optim.registry import build_optimizer

    name, vocab, seq_len, batch = SETUPS[bench_device.type]
    cfg = dataclasses.replace(get_model_config(name), vocab_size=vocab)
    torch.manual_seed(0)
    model = Llama(cfg).to(bench_device)
    if mode == "compiled":
        for block in model.layers:
            block.compile()
    optimizer = build_optimizer("adamw", model, {"lr": 1e-4, "weight_decay": 0.1})
    tokens = torch.randint(vocab, (batch, seq_len + 1), device=bench_device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bench_device.type == "cuda")

    def step():
        with autocast:
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the compiled variant compiles here, outside the measured rounds
    if bench_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench_device)
    flops = train_flops_per_token(cfg, seq_len) * batch * seq_len
    shapes = types.SimpleNamespace(name=f"{name}-b{batch}-s{seq_len}")
    measure(step, family="train-step", shapes=shapes, backend=mode, bound="matrix", work=flops)
    seconds = benchmark.extra_info["time_s"]
    peak = device_peak_flops(bench_device)
    benchmark.extra_info.update(tokens_per_s=batch * seq_len / seconds,
                                mfu=None if peak is None else flops / seconds / peak)
    if bench_device.type == "cuda":
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated(bench_device)
