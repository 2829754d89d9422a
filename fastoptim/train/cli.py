"""`fastoptim train`: one run from the command line.

    fastoptim train --model 130m --optimizer muon --chinchilla 1 --lr 0.016 --hp muon_to_adam_lr=0.2
    fastoptim train --model tiny --optimizer adamw --steps 200 --lr 3e-3 --batch-size 16 --seq-len 128
    fastoptim train --model 130m --optimizer adamw --lr 8e-3 --batch-size 128 --micro-batch auto --data shards/
    torchrun --nproc_per_node 8 -m fastoptim.cli train --model 130m --optimizer muon --zero1 --data shards/

Optimizer and schedule hyperparameters go in as `--hp key=value` (repeatable; values are read as Python literals,
else kept as strings); --lr, --batch-size and --warmup are shorthands for the commonest ones.
"""

import argparse
import ast
import sys

from fastoptim.train.loop import FSDP_PARAM_DTYPES, TrainConfig, train


def parse_hparam(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--hp {text!r}: expected key=value")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def parse_micro_batch(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--micro-batch {text!r}: expected a number or 'auto'") from None


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="fastoptim train", description="Pretrain a Llama model with one optimizer.")
    p.add_argument("--model", default=defaults.model, help="130m, 300m, 520m, 1.2b, tiny, tiny2")
    p.add_argument("--optimizer", default=defaults.optimizer, help="adamw, nadamw, mars, cautious, lion, mini, "
                                                                   "muon, scion, kron, soap, sophia")
    p.add_argument("--chinchilla", type=float, default=defaults.chinchilla,
                   help="data budget as a multiple of 20 tokens per non-embedding parameter")
    p.add_argument("--steps", type=int, help="fixed number of steps (overrides --chinchilla)")
    p.add_argument("--lr", type=float, help="peak learning rate (hparam lr)")
    p.add_argument("--batch-size", type=int, help="global batch size in sequences (hparam batch_size)")
    p.add_argument("--warmup", type=int, help="warmup steps (hparam warmup)")
    p.add_argument("--hp", type=parse_hparam, action="append", default=[], metavar="KEY=VALUE",
                   help="optimizer or schedule hyperparameter (beta1, weight_decay, lr_schedule, decay, ...)")
    p.add_argument("--seq-len", type=int, help="sequence length (default: the model preset's)")
    p.add_argument("--data", default=defaults.data,
                   help="'stdlib' (built-in corpus), or comma-separated text files/directories or .bin shards")
    p.add_argument("--eval-data", help="a separate eval set (shards, or text tokenized with the data's tokenizer); "
                                       "default: the data's held-out split")
    p.add_argument("--eval-tokens", type=int, default=defaults.eval_tokens,
                   help=f"size of the fixed eval set (default {defaults.eval_tokens:,})")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary for text data (default 4096); for llm.c shards, "
                                                  "the vocabulary their ids come from (default 65,536)")
    p.add_argument("--corpus-bytes", type=int, help="text to tokenize at most (default: all of it)")
    p.add_argument("--cache-dir", help="token cache (default $FASTOPTIM_CACHE or ~/.cache/fastoptim)")
    p.add_argument("--allow-repeat", action="store_true", help="allow more than one pass over the data")
    p.add_argument("--eval-every", type=int, help="steps between evaluations (default min(1000, steps-1))")
    p.add_argument("--log-every", type=int, default=defaults.log_every, help="steps between metrics records")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--out-dir", help="run folder (default runs/MODEL-OPTIMIZER-cCHINCHILLA-sSEED)")
    p.add_argument("--device", default=defaults.device, help="auto, cpu, cuda")
    p.add_argument("--micro-batch", type=parse_micro_batch,
                   help="sequences per forward and rank (a divisor of the per-rank batch), or 'auto' (probe the "
                        "GPU's memory once, cached); default: the whole per-rank batch")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=defaults.compile,
                   help="torch.compile each transformer block (default: on CUDA, off on CPU)")
    p.add_argument("--peak-tflops", type=float, help="the accelerator's bf16 dense peak for MFU (default: known "
                                                     "GPUs by name)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: at evaluations; 0: off)")
    p.add_argument("--checkpoint-every-s", type=float, default=defaults.checkpoint_every_s,
                   help="also checkpoint after this many seconds (default %(default)s)")
    p.add_argument("--keep-checkpoints", type=int, default=defaults.keep_checkpoints)
    p.add_argument("--keep-final-weights", action="store_true", help="a finished run keeps final_model.pt")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out-dir")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 under torchrun instead of DDP")
    p.add_argument("--fsdp-param-dtype", choices=list(FSDP_PARAM_DTYPES), default=defaults.fsdp_param_dtype,
                   help="with --fsdp: the dtype parameters are all-gathered and computed in (gradients reduce in "
                        "float32; the optimizer steps float32 shards)")
    p.add_argument("--fsdp-defer-grad-sync", action="store_true",
                   help="with --fsdp: reduce-scatter gradients once per step, after the last micro-batch (holds "
                        "unsharded gradients in between)")
    p.add_argument("--zero1", action="store_true", help="under torchrun: DDP with the optimizer state sharded over "
                                                        "the ranks (ZeRO-1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log-to", choices=["tensorboard", "wandb"], help="also log there (package must be installed)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    hparams = dict(args.hp)
    for key in ("lr", "batch_size", "warmup"):
        if getattr(args, key) is not None:
            hparams[key] = getattr(args, key)
    steps_tag = f"n{args.steps}" if args.steps else f"c{args.chinchilla:g}"
    return TrainConfig(
        model=args.model, optimizer=args.optimizer, hparams=hparams, chinchilla=args.chinchilla, seq_len=args.seq_len,
        steps=args.steps, eval_every=args.eval_every, eval_tokens=args.eval_tokens, eval_data=args.eval_data,
        seed=args.seed, data=args.data, vocab_size=args.vocab_size, corpus_bytes=args.corpus_bytes,
        cache_dir=args.cache_dir, allow_repeat=args.allow_repeat,
        out_dir=args.out_dir or f"runs/{args.model}-{args.optimizer}-{steps_tag}-s{args.seed}",
        device=args.device, micro_batch=args.micro_batch, compile=args.compile, log_every=args.log_every,
        checkpoint_every=args.checkpoint_every, checkpoint_every_s=args.checkpoint_every_s,
        keep_checkpoints=args.keep_checkpoints, keep_final_weights=args.keep_final_weights, resume=args.resume,
        fsdp=args.fsdp, fsdp_param_dtype=args.fsdp_param_dtype, fsdp_defer_grad_sync=args.fsdp_defer_grad_sync,
        zero1=args.zero1, progress=not args.no_progress, log_to=args.log_to,
        peak_flops=None if args.peak_tflops is None else args.peak_tflops * 1e12)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = train(config_from_args(args))
    except (ValueError, FileNotFoundError) as err:
        print(f"fastoptim train: error: {err}", file=sys.stderr)
        return 2
    print(f"run folder: {result.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
