"""An offline tokenizer: byte-level BPE trained once on the corpus with HF `tokenizers`, cached as JSON.

No package available offline ships a GPT-2 or Llama vocabulary, so the trainer fits its own: byte-level, so any text
encodes without unknown tokens; a small vocabulary (default 4096) suits the CPU-scale corpus and keeps the embedding
and output layers of tiny models small. Documents are separated by the end-of-text token, id 0.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

END_OF_TEXT = "<|endoftext|>"


def train_tokenizer(texts, vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer

