"""Product-key addressing: token -> ids and weights of its exact top-k memory slots, per head."""

import torch
import torch.nn.functional as F
from torch import nn

from ...ops import product_key_topk
from ...ops.dispatch import full_precision
from ..norms import make_query_norm
from ..parts import Addressing
from .subkeys import KeyRestart, balance_loss, kmeans

SCORE_FNS = ("softmax", "sigmoid", "relu", "identity")
SCORE_DTYPES = ("full", "bfloat16")
KEY_PARAMS = ("learned", "simvq", "frozen")
KEY_INITS = ("uniform", "kmeans")


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

    Remedies for sub-keys that stop being chosen (``reference/sparse_update.md``; all off by default):
    ``query_norm`` "batchnorm" | "whiten" | "layernorm_half" | "rmsnorm_half" (see ``norms``);
    ``key_param``: "learned" sub-keys (default), "simvq" (a frozen random basis ``keys`` times a learned
    per-head-half map ``key_map`` (H, 2, d, d) initialised to the identity: every step moves every sub-key,
    SimVQ), or "frozen" (the initial random sub-keys, never trained);
    ``key_init="kmeans"``: the first training forward points the sub-keys (the basis with "simvq") at k-means
    centroids of its sub-queries (keeping their initial mean norm);
    ``key_restart`` c in (0, 1): every ``restart_every`` optimizer steps (``after_step``, which a training loop
    must call), sub-keys chosen less than c times their uniform share (EMA over that many training forwards)
    move to recent sub-queries (``KeyRestart``);
    ``balance_loss`` weight and ``balance_tau``: ``aux_loss`` adds weight times the KL of the batch's marginal
    softmax(scores / tau) over each half's n sub-keys from uniform (``subkeys.balance_loss``).
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
        *,
        key_param: str = "learned",
        key_init: str = "uniform",
        key_restart: float = 0.0,
        restart_every: int = 100,
        balance_loss: float = 0.0,
        balance_tau: float = 1.0,
    ):
        super().__init__()
        for name, value, allowed in (
            ("score_fn", score_fn, SCORE_FNS),
            ("score_dtype", score_dtype, SCORE_DTYPES),
            ("key_param", key_param, KEY_PARAMS),
            ("key_init", key_init, KEY_INITS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not 0 <= key_restart < 1:
            raise ValueError(f"key_restart must be in [0, 1) (a fraction of the uniform share), got {key_restart}")
        if key_restart > 0 and key_param != "learned":
            raise ValueError(f"key_restart moves learned sub-keys: use key_param='learned', not {key_param!r}")
        self.dim, self.n_keys, self.heads, self.topk, self.key_dim = dim, n_keys, heads, topk, key_dim
        self.num_slots, self.grid = n_keys * n_keys, n_keys
        self.score_fn, self.score_dtype = score_fn, score_dtype
        half = key_dim // 2
        self.query = nn.Linear(dim, heads * key_dim, bias=query_bias)
        self.query_norm = make_query_norm(query_norm, heads, key_dim)
        self.query_dropout = nn.Dropout(query_dropout)
        self.qk_norm = nn.RMSNorm(half) if qk_norm else None
        keys = torch.empty(heads, 2, n_keys, half)  # (H, half index, n, key_dim/2)
        if key_param == "learned":
            self.keys = nn.Parameter(keys)
        else:
            self.register_buffer("keys", keys)  # simvq: the frozen basis
        self.key_map = nn.Parameter(torch.empty(heads, 2, half, half)) if key_param == "simvq" else None
        self.key_param, self.key_init = key_param, key_init
        self.balance_weight, self.balance_tau = balance_loss, balance_tau
        if key_init == "kmeans":  # in the state_dict: a resumed run does not cluster again
            self.register_buffer("keys_ready", torch.tensor(False))
        self._kmeans_pending = key_init == "kmeans"  # a host flag: no device sync per forward once done
        self.restarts = KeyRestart(heads, n_keys, half, key_restart, restart_every) if key_restart > 0 else None
        self.sync_group = None  # the balance loss's marginal over every rank's tokens (set by ``parallelize``)
        self._balance = None  # the last training forward's balance loss
        self.reset_parameters()

    @property
    def one_process_only(self) -> str | None:
        """Why this addressing cannot train on several processes (``parallelize`` refuses it), or None."""
        chosen = [name for name, on in (("key_restart", self.restarts is not None),
                                        ("key_init='kmeans'", self._kmeans_pending)) if on]  # fmt: skip
        if not chosen:
            return None
        verb = "moves" if len(chosen) == 1 else "move"
        return f"{' and '.join(chosen)} {verb} sub-keys on one process only: turn them off to train on several"

    def reset_parameters(self) -> None:
        bound = self.key_dim**-0.5
        nn.init.uniform_(self.keys, -bound, bound)
        if self.key_map is not None:
            self.key_map.data.copy_(torch.eye(self.key_map.shape[-1]).expand_as(self.key_map))
        nn.init.xavier_uniform_(self.query.weight)
        if self.query.bias is not None:
            nn.init.zeros_(self.query.bias)

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        keys = [p for p in (self.keys, self.key_map) if isinstance(p, nn.Parameter)]
        return {"keys": keys, "dense": [p for p in self.parameters() if all(p is not k for k in keys)]}

    def scored_keys(self, dtype: torch.dtype) -> torch.Tensor:
        """The sub-keys as scored, (H, 2, n, key_dim/2): the basis times the map with "simvq", then qk-normalised."""
        keys = self.keys.to(dtype)
        if self.key_map is not None:
            keys = keys @ self.key_map.to(dtype)
        if self.qk_norm is not None:
            keys = F.rms_norm(keys, keys.shape[-1:]) * keys.shape[-1] ** -0.5
        return keys

    def aux_loss(self) -> torch.Tensor | None:
        """The last training forward's weighted balance loss (0 before the first); None in eval or without one."""
        if not (self.training and self.balance_weight > 0):
            return None
        return self.keys.new_zeros(()) if self._balance is None else self._balance

    def after_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        if self.restarts is not None:
            self.restarts.restart(self.keys, optimizer)

    @torch.compiler.disable  # once, eager: dynamo would unroll k-means++'s loop into a huge graph
    @torch.no_grad()
    def _kmeans_init(self, halves: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None) -> None:
        """Sub-keys (or the simvq basis) := the directions of k-means centroids of the batch's real sub-queries, per
        head and half, at the initial keys' mean norm (scores are dot products: a centroid's own norm, that of
        the queries, would rank keys by length more than by direction)."""
        self._kmeans_pending = not bool(self.keys_ready)  # False after loading a state that had them
        if not self._kmeans_pending:
            return
        real = [h if mask is None else h[mask] for h in halves]  # (T', H, d)
        if real[0].shape[0] == 0:
            return  # nothing to cluster yet: try again on the next batch
        for a, h in enumerate(real):
            for head in range(self.heads):
                centroids = kmeans(h[:, head], self.n_keys)
                norm = self.keys[head, a].float().norm(dim=-1).mean()
                self.keys[head, a] = (centroids / centroids.norm(dim=-1, keepdim=True).clamp_min(1e-12) * norm).to(
                    self.keys.dtype
                )
        self.keys_ready.fill_(True)
        self._kmeans_pending = False

    def flops_per_token(self) -> int:
        """Per token, with h heads, n sub-keys per half, top-k, key_dim d_k, width dim:
        query projection 2*dim*h*d_k; sub-key scores of both halves 2*h*n*d_k; each half's top-k, one
        comparison per score, 2*h*n; the grid cells that can win (``grid_candidates_count``), one add
        each and one comparison each in the final top-k, 2*h*C; the score function."""
        h, n, k = self.heads, self.n_keys, self.topk
        flops = 2 * self.dim * h * self.key_dim + 2 * h * n * self.key_dim + 2 * h * n
        flops += getattr(self.query_norm, "flops_per_token", lambda: 0)()  # whitening's matrix; other norms ~0
        return flops + 2 * h * grid_candidates_count(k) + score_fn_flops(self.score_fn, h * k)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, token_ids=None, state=None):
        """x (T, dim), mask (T,) bool or None -> ids (T, H, k) int64, weights (T, H, k).

        Weights are float32, or float64 for a float64 x (also under autocast); scores likewise, or
        bfloat16 with ``score_dtype="bfloat16"``.
        """
        T = x.shape[0]
        dtype = torch.promote_types(x.dtype, torch.float32)
        q = self.query(x)  # (T, H*key_dim)
        masked_norm = getattr(self.query_norm, "takes_mask", False)
        if masked_norm:
            q = self.query_norm(q, mask)
        q = q.view(T, self.heads, self.key_dim)
        if self.query_norm is not None and not masked_norm:
            q = self.query_norm(q)
        q = self.query_dropout(q)
        with full_precision(x.device):
            q1, q2 = q.to(dtype).view(T, self.heads, 2, self.key_dim // 2).unbind(2)  # (T, H, key_dim/2) each
            if self.qk_norm is not None:
                gain = self.qk_norm.weight.to(dtype)  # a bf16 gain with fp32 halves misses the fused rms_norm
                q1, q2 = (F.rms_norm(h, h.shape[-1:], gain, self.qk_norm.eps) for h in (q1, q2))
            if self.training and self._kmeans_pending:
                self._kmeans_init((q1, q2), mask)
            keys = self.scored_keys(dtype)
            if self.training and self.balance_weight > 0:
                self._balance = self.balance_weight * balance_loss(
                    (q1, q2), keys, self.balance_tau, mask, self.sync_group
                )
            if self.score_dtype == "bfloat16":
                q1, q2, keys = q1.bfloat16(), q2.bfloat16(), keys.bfloat16()
            scores, indices = product_key_topk(q1, q2, keys[:, 0], keys[:, 1], self.topk)
            if self.training and self.restarts is not None:
                self.restarts.observe((q1, q2), indices, mask)
            return indices, apply_score_fn(scores.to(dtype), self.score_fn)

    def extra_repr(self) -> str:
        return (
            f"n_keys={self.n_keys} (N={self.n_keys**2}), heads={self.heads}, topk={self.topk}, "
            f"key_dim={self.key_dim}, score_fn={self.score_fn!r}"
            + (f", score_dtype={self.score_dtype!r}" if self.score_dtype != "full" else "")
            + (f", key_param={self.key_param!r}" if self.key_param != "learned" else "")
            + (f", balance_loss={self.balance_weight}, tau={self.balance_tau}" if self.balance_weight else "")
        )
