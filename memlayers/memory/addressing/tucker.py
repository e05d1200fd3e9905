"""Tucker product-key addressing: UltraMem's TDQKR with multi-core scoring (Huang et al., ICLR 2025, arXiv 2411.12364).

Per head h, each side (row, column) has rank-r keys; a token's row scores ``S_row (r, n)`` and column
scores ``S_col (r, n)`` combine through C learned r x r cores: slot ``i*n + j`` scores
``S_row[:, i]ᵀ C_c S_col[:, j]`` under core c. Slots are ranked by the sum over cores ``C_sum = Σ_c C_c``;
each selected slot keeps one weight per core (multi-core scoring: core c weights the c-th column slice
of the value, see ``ImplicitValueExpansion``).

Ranking all n² cells would cost O(n²); a rank-1 approximation of ``C_sum`` (its leading singular pair
``σ u vᵀ``) gives each row a filter score ``a_i = u·S_row[:, i]`` and each column ``b_j = v·S_col[:, j]``,
the candidates are a few rows x a few columns, and only they are scored with the full core.
"""

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ...ops.dispatch import full_precision
from ...ops.product_key_topk.library import tucker_select
from ...ops.tucker_cells import tucker_cells
from ...ops.tucker_cells.library import tucker_sides_backward
from ..parts import Addressing
from .product_keys import SCORE_FNS, apply_score_fn, score_fn_flops

_MIN_TOP_MEAN = 0.25  # floor on E[mean top-m]: with m close to n the mean tends to 0 and the gain to infinity


@lru_cache
def expected_top_mean(n: int, m: int, seed: int = 0) -> float:
    """E[mean of the m largest of n i.i.d. N(0, 1)], estimated from a fixed-seed sample of about 2^20
    draws (the same value on every machine and call; the global RNG is not touched)."""
    draws = max(64, (1 << 20) // n)
    x = torch.randn(draws, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64, device="cpu")
    return x.topk(m, dim=1).values.mean().item()


def singular_values_2x2(m: torch.Tensor) -> torch.Tensor:
    """m (..., 2, 2) -> its singular values (..., 2), descending: with p = |(a+d, c-b)| and q = |(a-d, b+c)|,
    σ1 = (p + q) / 2 and σ2 = |p - q| / 2. Differentiable (a tiny epsilon keeps the square roots' gradients
    finite), no host sync."""
    a, b, c, d = m[..., 0, 0], m[..., 0, 1], m[..., 1, 0], m[..., 1, 1]
    p = ((a + d).square() + (c - b).square() + 1e-12).sqrt()
    q = ((a - d).square() + (b + c).square() + 1e-12).sqrt()
    return torch.stack(((p + q) / 2, (p - q).abs() / 2), dim=-1)


class SelectedScores(torch.autograd.Function):
    """The side scores at the chosen sub-keys, ``sr = S_row[t, h, a, i[t, h, k]]`` and ``sc = S_col[.., j[t, h, k]]``
    (T, H, r, k) each, as the selection read them (the very floats it ranked), made differentiable in the queries
    q (T, H, Q, 2, d) and keys (H, 2, r, n, d): the backward (``memlayers.ops.tucker_cells``' side scores backward, a
    bag over the chosen keys and its value gradient) touches the chosen keys only, with no (T, H, r, n) score
    gradient."""

    @staticmethod
    def forward(ctx, sr, sc, q, keys, i, j):
        ctx.save_for_backward(q, keys, i, j)
        return sr, sc

    @staticmethod
    @once_differentiable
    def backward(ctx, g_row, g_col):
        q, keys, i, j = ctx.saved_tensors
        d_q, d_keys = tucker_sides_backward(q, keys, i, j, g_row.contiguous(), g_col.contiguous())
        need_q, need_keys = ctx.needs_input_grad[2:4]
        return None, None, d_q if need_q else None, d_keys if need_keys else None, None, None


class TuckerProductKeys(Addressing):
    """Rank-r Tucker product keys with a rank-1 pre-filter (TDQKR) and C score cores (MCS).

    Per head h (of ``heads``), side s in {row, col} and rank a (of ``rank``):
        query ``q[h, s] = LN(W_q x)`` (key_dim/2 wide; with ``query_per_rank`` one per rank, UltraMemV2),
        keys ``K[h, s, a] = LN_k(keys[h, s, a])`` (n_keys rows of key_dim/2), scores ``S_s[a, i] = K[h,s,a,i]·q``;
        slot ``i*n + j`` scores ``S_row[:, i]ᵀ C_c S_col[:, j]`` under core c of ``cores``.
    Ranking uses ``C_sum = Σ_c C_c``: with its leading singular pair ``σ u vᵀ`` (a buffer, refreshed every
    ``svd_every`` training forwards), row i gets ``a_i = u·S_row[:, i]`` and column j ``b_j = v·S_col[:, j]``;
    the candidates are the top-m rows x top-m columns AND the bottom-m rows x bottom-m columns
    (m = ``prefilter``), scored with the full ``C_sum``; the best ``topk`` are the token's slots.

    The bottom x bottom block is our fix: the published code takes top x top only, which misses every
    cell where both factors are negative (their product is positive: half of the best cells when scores
    are symmetric). With both blocks the filter is exact for a rank-1 ``C_sum`` whenever the k-th best
    grid score is >= 0, and it does not depend on the signs of u and v.

    Normalisation (UltraMem's "qk LN" and init): LayerNorms over key_dim/2 on queries and keys; the key
    LN gain starts at (key_dim/2)^-1/2 and the query LN gain at 1/sqrt(E[mean of the top-k of n_keys
    N(0,1)]) (``expected_top_mean``, fixed-seed Monte Carlo, floored at 0.25), so a score starts as
    N(0, gain²). Cores start U(0, 1) as in the official code; keys N(0, (key_dim/2)^-1/2); W_q Xavier.

    The filter's (u, v) and a step counter are persistent buffers (a checkpoint resumes exactly). (u, v) is
    the leading singular pair of ``C_sum`` by power iteration, a few steps on every due training forward,
    warm-started from the previous pair: no SVD and no host sync, and u never turns against its previous
    direction (the ranking does not need that, but logged filters stay smooth).

    Args:
        dim: input width. n_keys: n, sub-keys per side (n² slots). heads, topk: slots read per token.
        key_dim: query width per head (two halves of key_dim/2: row, column). rank: r. cores: C.
        prefilter: m rows and m columns per block (default topk; in [topk, n_keys]; n_keys is exact).
        svd_every: training forwards between refreshes of (u, v). score_fn: see ``apply_score_fn``
        ("identity": UltraMem removes the softmax). query_per_rank: one query per side and rank (V2).
        query_bias: bias of W_q. aux_weight, aux_tau: the core penalty (``aux_loss``). query_dropout.

    forward(x (T, dim), mask, token_ids, state) -> ids (T, H, k) int64 in [0, n²), weights (T, H, k)
    when cores == 1 else (T, H, k, C): per core, the selected slots' core-c scores (with gradient)
    through ``score_fn`` (softmax: over each head's k, per core). Float32 (float64 for float64 x).
    """

    def __init__(
        self,
        dim: int,
        n_keys: int,
        heads: int,
        topk: int,
        key_dim: int,
        rank: int = 2,
        cores: int = 2,
        prefilter: int | None = None,
        svd_every: int = 1,
        score_fn: str = "identity",
        query_per_rank: bool = False,
        query_bias: bool = False,
        aux_weight: float = 0.001,
        aux_tau: float = 0.15,
        query_dropout: float = 0.0,
    ):
        super().__init__()
        prefilter = topk if prefilter is None else prefilter
        for name, value, ok, fix in (
            ("score_fn", score_fn, score_fn in SCORE_FNS, f"choose one of {SCORE_FNS}"),
            ("key_dim", key_dim, key_dim >= 2 and key_dim % 2 == 0, "use an even width (two halves)"),
            ("rank", rank, rank >= 1, "use e.g. 2"),
            ("cores", cores, cores >= 1, "use e.g. 2"),
            ("topk", topk, 1 <= topk <= n_keys, f"use a value in [1, n_keys={n_keys}]"),
            ("prefilter", prefilter, topk <= prefilter <= n_keys, f"use a value in [topk={topk}, n_keys={n_keys}]"),
            ("svd_every", svd_every, svd_every >= 1, "use 1 (every training forward)"),
            ("aux_weight", aux_weight, aux_weight >= 0, "use 0 to disable the core penalty"),
        ):
            if not ok:
                raise ValueError(f"TuckerProductKeys: {name}={value!r} is invalid; {fix}")
        self.dim, self.n_keys, self.heads, self.topk, self.key_dim = dim, n_keys, heads, topk, key_dim
        self.rank, self.num_cores, self.prefilter, self.svd_every = rank, cores, prefilter, svd_every
        self.score_fn, self.query_per_rank = score_fn, query_per_rank
        self.aux_weight, self.aux_tau = aux_weight, aux_tau
        self.num_slots, self.grid = n_keys * n_keys, n_keys
        half = key_dim // 2
        self.query_ranks = rank if query_per_rank else 1
        self.query = nn.Linear(dim, heads * self.query_ranks * key_dim, bias=query_bias)
        self.query_norm = nn.LayerNorm(half)
        self.key_norm = nn.LayerNorm(half)
        self.query_dropout = nn.Dropout(query_dropout)
        self.keys = nn.Parameter(torch.empty(heads, 2, rank, n_keys, half))  # (H, side, r, n, key_dim/2)
        self.cores = nn.Parameter(torch.empty(cores, heads, rank, rank))  # (C, H, r, r)
        self.register_buffer("u", torch.zeros(heads, rank))
        self.register_buffer("v", torch.zeros(heads, rank))
        self.register_buffer("svd_step", torch.zeros((), dtype=torch.int64))
        self.query_gain = max(expected_top_mean(n_keys, topk), _MIN_TOP_MEAN) ** -0.5
        self.reset_parameters()

    def reset_parameters(self) -> None:
        half = self.key_dim // 2
        nn.init.normal_(self.keys, std=half**-0.5)
        nn.init.uniform_(self.cores, 0.0, 1.0)
        nn.init.xavier_uniform_(self.query.weight)
        if self.query.bias is not None:
            nn.init.zeros_(self.query.bias)
        nn.init.constant_(self.query_norm.weight, self.query_gain)
        nn.init.constant_(self.key_norm.weight, half**-0.5)
        nn.init.zeros_(self.query_norm.bias)
        nn.init.zeros_(self.key_norm.bias)
        with torch.no_grad():  # the first pair, from a uniform start, converged
            u, v = self.leading_pair(torch.ones_like(self.u), squarings=6)
            self.u.copy_(u)
            self.v.copy_(v)
            self.svd_step.zero_()

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        """Keys and cores are addressing tables ("keys": no weight decay, which would pull the U(0, 1) cores to
        0); the query projection and the LayerNorms are "dense"."""
        keys = [self.keys, self.cores]
        return {"keys": keys, "dense": [p for p in self.parameters() if all(p is not k for k in keys)]}

    @torch.no_grad()
    def leading_pair(self, prev_u: torch.Tensor, squarings: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """The leading singular vectors (u, v) (H, r) each of every head's ``C_sum``, by 2^squarings power iterations
        from ``prev_u``: ``u ∝ (C Cᵀ)^p prev_u`` with the power made by squaring (normalised each time), ``v ∝ Cᵀ u``.
        Small matmuls only (``torch.linalg.svd`` would sync a GPU with the host every step), and the new u never
        points away from the previous one (``u·prev_u ∝ prev_uᵀ (C Cᵀ)^p prev_u >= 0``)."""
        core = self.cores.detach().float().sum(0)  # (H, r, r)
        power = core @ core.transpose(1, 2)
        for _ in range(squarings):  # normalised before each squaring: no overflow, no underflow
            power = power / power.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1)
            power = power @ power
        u = F.normalize((power @ prev_u.float().unsqueeze(-1)).squeeze(-1), dim=-1)
        return u, F.normalize((core.transpose(1, 2) @ u.unsqueeze(-1)).squeeze(-1), dim=-1)

    @torch.no_grad()
    def refresh_filter(self) -> None:
        """One training forward's update of the filter: (u, v) moved on by a few power iterations when
        ``svd_step`` is a multiple of ``svd_every``, then ``svd_step += 1`` (no host sync)."""
        u, v = self.leading_pair(self.u)
        if self.svd_every > 1:  # (every forward is due otherwise: no step arithmetic)
            due = self.svd_step % self.svd_every == 0
            u, v = torch.where(due, u.to(self.u.dtype), self.u), torch.where(due, v.to(self.v.dtype), self.v)
        self.u.copy_(u)
        self.v.copy_(v)
        self.svd_step.add_(1)

    def aux_loss(self) -> torch.Tensor | None:
        """``aux_weight / (r-1) * Σ_{i>=2} max(0, λ_i - aux_tau)²`` over the singular values λ of each head's
        ``C_sum``, averaged over heads (pushes ``C_sum`` towards rank 1, where the filter is exact); 0 for
        rank 1, None when aux_weight is 0. Differentiable: for rank 2 in closed form, for larger ranks by
        ``torch.linalg.svdvals`` (which syncs a GPU with the host)."""
        if self.aux_weight == 0:
            return None
        if self.rank == 1:
            return self.cores.new_zeros(())
        core = self.cores.sum(0)
        core = core.to(torch.promote_types(core.dtype, torch.float32))
        lam = singular_values_2x2(core) if self.rank == 2 else torch.linalg.svdvals(core)  # (H, r), descending
        penalty = F.relu(lam[:, 1:] - self.aux_tau).square().sum(-1) / (self.rank - 1)
        return self.aux_weight * penalty.mean()

    def flops_per_token(self) -> int:
        """Per token, with h heads, rank r, C cores, n sub-keys per side, d = key_dim/2, m = prefilter, k = topk:
        query projection 2*dim*h*q*2d (q = r per-rank queries, else 1); side scores 2*h*r*n*d per side;
        filter scores 2*h*r*n per side; top-m and bottom-m selections, one comparison per score, 4*h*n;
        candidates, per block (2 blocks): the m selected rows times C_sum 2*h*m*r², then the m x m grid
        2*h*m²*r; the final top-k, one comparison per candidate, 2*h*m²; the k weights per core
        2*h*k*C*(r² + r); the score function on h*k*C scores. With m = n there is one block. (LayerNorms and
        the power iterations on the r x r core not counted.)"""
        h, r, n, m, k, C = self.heads, self.rank, self.n_keys, self.prefilter, self.topk, self.num_cores
        d = self.key_dim // 2
        flops = 2 * self.dim * h * self.query_ranks * self.key_dim
        flops += 2 * (2 * h * r * n * d) + 2 * (2 * h * r * n) + 4 * h * n
        blocks = 1 if m == n else 2  # top x top, and bottom x bottom unless the top block is everything
        flops += blocks * (2 * h * m * r * r + 2 * h * m * m * r + h * m * m)
        flops += 2 * h * k * C * (r * r + r)
        return flops + score_fn_flops(self.score_fn, h * k * C)

    def queries_and_keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, dim) -> the normalised queries (T, H, Q, 2, key_dim/2) (Q = rank with ``query_per_rank``, else 1)
        and keys (H, 2, r, n, key_dim/2), float32 (float64 for a float64 x; also under autocast)."""
        T, half = x.shape[0], self.key_dim // 2
        dtype = torch.promote_types(x.dtype, torch.float32)
        q = self.query(x).view(T, self.heads, self.query_ranks, 2, half)  # the projection may run in bf16
        q = self.query_dropout(self.query_norm(q)).to(dtype)  # (autocast runs LayerNorm in fp32)
        return q, self.key_norm(self.keys).to(dtype)

    @staticmethod
    def scores(q: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q (T, H, Q, 2, d), keys (H, 2, r, n, d) -> S_row, S_col (T, H, r, n) each."""
        with full_precision(q.device):  # one einsum per side: slices of a joint one cost a zero-filled gradient each
            if q.shape[2] > 1:
                return tuple(torch.einsum("thad,haid->thai", q[:, :, :, s], keys[:, s]) for s in (0, 1))
            return tuple(torch.einsum("thd,haid->thai", q[:, :, 0, s], keys[:, s]) for s in (0, 1))

    def side_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, dim) -> S_row, S_col (T, H, r, n) each, float32 (float64 for a float64 x; also under autocast)."""
        return self.scores(*self.queries_and_keys(x))

    @torch.no_grad()
    def select(self, s_row: torch.Tensor, s_col: torch.Tensor):
        """S_row, S_col (T, H, r, n) -> the rows and columns (T, H, k) int64 of each head's k best candidates under
        ``C_sum``, best first, and their side scores (T, H, r, k)."""
        u, v, core = (x.to(s_row.dtype) for x in (self.u, self.v, self.cores.sum(0)))
        with full_precision(s_row.device):  # the reference's grid is a matmul: not in bf16 under autocast
            return tucker_select(s_row, s_col, u, v, core, self.prefilter, self.topk)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, token_ids=None, state=None):
        """x (T, dim) -> ids (T, H, k) int64, weights (T, H, k) (cores == 1) or (T, H, k, C)."""
        if self.training:
            self.refresh_filter()
        q, keys = self.queries_and_keys(x)
        with torch.no_grad():
            s_row, s_col = self.scores(q, keys)  # (T, H, r, n) each
        i, j, sr, sc = self.select(s_row, s_col)  # (T, H, k) each, (T, H, r, k) each
        with full_precision(x.device):
            sr, sc = SelectedScores.apply(sr, sc, q, keys, i, j)  # with gradient
            scores = tucker_cells(sr, sc, self.cores)  # (T, H, C, k)
            weights = apply_score_fn(scores, self.score_fn).transpose(-1, -2)  # (T, H, k, C)
        return i * self.n_keys + j, weights.squeeze(-1) if self.num_cores == 1 else weights

    def extra_repr(self) -> str:
        return (
            f"n_keys={self.n_keys} (N={self.num_slots}), heads={self.heads}, topk={self.topk}, key_dim={self.key_dim}, "
            f"rank={self.rank}, cores={self.num_cores}, prefilter={self.prefilter}, score_fn={self.score_fn!r}"
        )
