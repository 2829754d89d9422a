"""Corpus, tokenizer, token shards and the resumable loader."""

from fastoptim.data.dataset import TokenData, check_data_spec, default_cache_dir, prepare_data
from fastoptim.data.loader import TrainLoader, check_batch_divisible, validation_batches

__all__ = ["TokenData", "TrainLoader", "check_batch_divisible", "check_data_spec", "default_cache_dir",
           "prepare_data", "validation_batches"]
