"""Ops: each has a plain-PyTorch reference beside any kernel, and a dispatching entry point."""

from .embedding_bag import embedding_bag, embedding_bag_naive
from .gather_dot import gather_dot
from .product_key_topk import product_key_topk

__all__ = ["embedding_bag", "embedding_bag_naive", "gather_dot", "product_key_topk"]
