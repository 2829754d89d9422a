"""The paper's Llama family (130M, 300M, 520M, 1.2B) and tiny sizes for CPU runs and tests."""

from fastoptim.models.llama import MODEL_CONFIGS, Llama, LlamaConfig, get_model_config, non_embedding_params

__all__ = ["MODEL_CONFIGS", "Llama", "LlamaConfig", "get_model_config", "non_embedding_params"]
