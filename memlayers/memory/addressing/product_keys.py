"""Product-key addressing: token -> ids and weights of its exact top-k memory slots, per head."""

import torch
import torch.nn.functional as F
from torch import nn

from ...ops import product_key_topk
from ...ops.dispatch import full_precision
from ..norms import MaskedBatchNorm, make_query_norm
from ..parts import Addressing

SCORE_FNS = ("softmax", "sigmoid", "relu", "identity")
SCORE_DTYPES = ("full", "bfloat16")


def apply_score_fn(scores: torch.Tensor, score_fn: str) -> torch.Tensor:
    """Weights from the selected scores (..., k): softmax over the k, sigmoid, relu, or the scores themselves."""
    if score_fn == "softmax":
        return scores.softmax(dim=-1)
    if score_fn == "sigmoid":
        return scores.sigmoid()
    if score_fn == "relu":
        return F.relu(scores)
    return scores


def score_fn_flops(score_fn: str, reads: int) -> int:
    """softmax: exp, sum, divide per read slot; sigmoid: exp, add, divide; relu: one max; identity: nothing."""
    return {"softmax": 3 * reads, "sigmoid": 3 * reads, "relu": reads}.get(score_fn, 0)


def grid_candidates_count(k: int) -> int:
    """Cells of the k x k grid that can be among the top k: sum_r floor(k / r) <= k (1 + ln k)."""
    return sum(k // r for r in range(1, k + 1))


class ProductKeys(Addressing):
    """Query projection, normalisation and exact product-key top-k (Lample et al. 2019).

    Per head: ``q = Norm(W_q x)`` split into halves ``q1, q2`` of key_dim/2; sub-key tables
    ``K1, K2`` of ``n_keys`` rows; slot ``i*n + j`` scores ``K1[i]·q1 + K2[j]·q2``; the top-k
    slots of all n*n are found exactly and their scores go through ``score_fn`` (softmax over
    each head's k scores, sigmoid, relu, or identity).

    With ``qk_norm`` the query halves (learned gain) and the sub-keys (no gain) are RMS-normalised
    and scores scaled by (key_dim/2)^-1/2, as attention's qk-norm; the query gain then acts as a
    learned inverse temperature.

    ``score_dtype``: "full" (default) scores in float32 (float64 for a float64 x) with autocast off;
    "bfloat16" casts the (normalised) query halves and sub-keys to bfloat16 and scores on bf16
    tensor cores (also outside autocast). The selection is then exact for the bf16 scores: the top
    k of all n*n sums ``s1[i] + s2[j]`` of bf16 half scores, each sum rounded to bf16, ties to the
    lower slot id (see ``ops/product_key_topk/reference.py``), not of the float32 scores; the
    weights are computed in float32 from those bf16 scores.
    """

    def __init__(
        self,
        dim: int,
        n_keys: int,
        heads: int,
        topk: int,
        key_dim: int,
        query_bias: bool = True,
        query_norm: str = "none",
        qk_norm: bool = False,
        score_fn: str = "softmax",
        query_dropout: float = 0.0,
        score_dtype: str = "full",
    ):
        super().__init__()
        if score_fn not in SCORE_FNS:
            raise ValueError(f"score_fn must be one of {SCORE_FNS}, got {score_fn!r}")
        if score_dtype not in SCORE_DTYPES:
            raise ValueError(f"score_dtype must be one of {SCORE_DTYPES}, got {score_dtype!r}")
        self.dim, self.n_keys, self.heads, self.topk, self.key_dim = dim, n_keys, heads, topk, key_dim
        self.num_slots, self.grid = n_keys * n_keys, n_keys
        self.score_fn, self.score_dtype = score_fn, score_dtype
        half = key_dim // 2
        self.query = nn.Linear(dim, heads * key_dim, bias=query_bias)
        self.query_norm = make_query_norm(query_norm, heads, key_dim)
        self.query_dropout = nn.Dropout(query_dropout)
        self.qk_norm = nn.RMSNorm(half) if qk_norm else None
        self.keys = nn.Parameter(torch.empty(heads, 2, n_keys, half))  # (H, half index, n, key_dim/2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = self.key_dim**-0.5
        nn.init.uniform_(self.keys, -bound, bound)
        nn.init.xavier_uniform_(self.query.weight)
        if self.query.bias is not None:
            nn.init.zeros_(self.query.bias)

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        return {"keys": [self.keys], "dense": [p for p in self.parameters() if p is not self.keys]}

    def flops_per_token(self) -> int:
        """Per token, with h heads, n sub-keys per half, top-k, key_dim d_k, width dim:
        query projection 2*dim*h*d_k; sub-key scores of both halves 2*h*n*d_k; each half's top-k, one
        comparison per score, 2*h*n; the grid cells that can win (``grid_candidates_count``), one add
        each and one comparison each in the final top-k, 2*h*C; the score function."""
        h, n, k = self.heads, self.n_keys, self.topk
        flops = 2 * self.dim * h * self.key_dim + 2 * h * n * self.key_dim + 2 * h * n
        return flops + 2 * h * grid_candidates_count(k) + score_fn_flops(self.score_fn, h * k)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, token_ids=None, state=None):
        """x (T, dim), mask (T,) bool or None -> ids (T, H, k) int64, weights (T, H, k).

        Weights are float32, or float64 for a float64 x (also under autocast); scores likewise, or
        bfloat16 with ``score_dtype="bfloat16"``.
        """
        T = x.shape[0]
        dtype = torch.promote_types(x.dtype, torch.float32)
        q = self.query(x)  # (T, H*key_dim)
        if isinstance(self.query_norm, MaskedBatchNorm):
            q = self.query_norm(q, mask)
        q = q.view(T, self.heads, self.key_dim)
        if self.query_norm is not None and not isinstance(self.query_norm, MaskedBatchNorm):
            q = self.query_norm(q)
        q = self.query_dropout(q)
        with full_precision(x.device):
            q1, q2 = q.to(dtype).view(T, self.heads, 2, self.key_dim // 2).unbind(2)  # (T, H, key_dim/2) each
            keys = self.keys.to(dtype)
            if self.qk_norm is not None:
                gain = self.qk_norm.weight.to(dtype)  # a bf16 gain with fp32 halves misses the fused rms_norm
                q1, q2 = (F.rms_norm(h, h.shape[-1:], gain, self.qk_norm.eps) for h in (q1, q2))
                keys = F.rms_norm(keys, keys.shape[-1:]) * keys.shape[-1] ** -0.5
            if self.score_dtype == "bfloat16":
                q1, q2, keys = q1.bfloat16(), q2.bfloat16(), keys.bfloat16()
            scores, indices = product_key_topk(q1, q2, keys[:, 0], keys[:, 1], self.topk)
            return indices, apply_score_fn(scores.to(dtype), self.score_fn)

    def extra_repr(self) -> str:
        return (
            f"n_keys={self.n_keys} (N={self.n_keys**2}), heads={self.heads}, topk={self.topk}, "
            f"key_dim={self.key_dim}, score_fn={self.score_fn!r}"
            + (f", score_dtype={self.score_dtype!r}" if self.score_dtype != "full" else "")
        )
