"""Addressing: which slots each token reads, and with what weights."""

from .ngram_hash import HashedNGrams
from .product_keys import SCORE_FNS, ProductKeys
from .tucker import TuckerProductKeys

__all__ = ["SCORE_FNS", "HashedNGrams", "ProductKeys", "TuckerProductKeys"]
