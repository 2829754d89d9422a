"""Corpus, tokenizer, token shards, the resumable loader and the fixed eval set."""

from fastoptim.data.dataset import (Capacity, TokenData, check_data_spec, data_capacity, default_cache_dir,
                                    prepare_data, prepare_eval_data)
from fastoptim.data.loader import EvalSet, TrainLoader, check_batch_divisible, eval_set

__all__ = ["Capacity", "EvalSet", "TokenData", "TrainLoader", "check_batch_divisible", "check_data_spec",
           "data_capacity", "default_cache_dir", "eval_set", "prepare_data", "prepare_eval_data"]
