"""Build small models offline: a code corpus from this machine, a BPE tokenizer, pre-training.

The serving stack needs a real checkpoint and tokenizer to test against when no model hub is
reachable; per-language corpora also feed adapter fine-tuning.
"""

from flora.model.tiny.bpe import SPECIAL_TOKENS, save_tokenizer, train_tokenizer
from flora.model.tiny.build import TinyModelOptions, ensure_tiny_model, make_tiny_model
from flora.model.tiny.corpus import LANGUAGES, available_languages, collect, split_holdout

__all__ = [
    "LANGUAGES",
    "SPECIAL_TOKENS",
    "TinyModelOptions",
    "available_languages",
    "collect",
    "ensure_tiny_model",
    "make_tiny_model",
    "save_tokenizer",
    "split_holdout",
    "train_tokenizer",
]
