"""The tiny default model: a StarCoder-architecture checkpoint and BPE tokenizer built offline
from source code on this machine (``model: tiny`` in a Serve config, ``flora make-tiny-model``).

It lives beside the model, not in :mod:`flora.train`, because serving builds it on first start
and serving imports no training code; :mod:`flora.train` re-exports it (``make_tiny_model``).
"""

from flora.model.tiny.build import TinyModelOptions, ensure_tiny_model, make_tiny_model, read_record

__all__ = ["TinyModelOptions", "ensure_tiny_model", "make_tiny_model", "read_record"]
