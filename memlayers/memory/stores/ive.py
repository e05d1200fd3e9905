"""Implicit value expansion (UltraMem, Huang et al., ICLR 2025, arXiv 2411.12364): E virtual tables V W_p."""

import torch
from torch import nn

from ...ops import embedding_bag
from ...ops.dispatch import use_triton
from .servable import ServableStore


class RowSlices(torch.autograd.Function):
    """table (N, d) -> the (N*C, d/C) view whose row r*C + c is column slice c of row r. Autograd's own view
    cannot take a row-sparse gradient back (sparse reshape); this backward maps it to (N, d) row-sparse."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, C: int) -> torch.Tensor:
        ctx.shape, ctx.C = table.shape, C
        return table.view(table.shape[0] * C, table.shape[1] // C)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (N, d), C = ctx.shape, ctx.C
        if not grad.is_sparse:
            return grad.reshape(N, d), None
        grad = grad.coalesce()
        slices = grad.indices()[0]
        rows, at = torch.unique(slices // C, return_inverse=True)
        values = grad.values().new_zeros(rows.numel(), C, d // C)
        values[at, slices % C] = grad.values()
        grad = torch.sparse_coo_tensor(
            rows.unsqueeze(0), values.view(-1, d), (N, d), is_coalesced=True, check_invariants=False
        )
        return grad, None


def pool(
    table: torch.Tensor, block: torch.Tensor, row: torch.Tensor, weights: torch.Tensor, E: int, sparse_grad: bool
) -> torch.Tensor:
    """Each token's entries pooled per block: table (N, d), block and row (T, L), weights (T, L, C) ->
    (T, E, d) where C equal column slices of each row are weighted apart (slice c by ``weights[..., c]``)."""
    T, L, C = weights.shape
    d = table.shape[1]
    table = table if C == 1 else RowSlices.apply(table, C)  # (N*C, d/C): row r*C + c is slice c
    cores = torch.arange(C, device=row.device)
    if use_triton("embedding_bag", "auto", table):  # the Triton bag: one bag per (token, block, core)
        w = weights.transpose(1, 2)  # (T, C, L)
        in_block = block.unsqueeze(1) == torch.arange(E, device=row.device).view(1, E, 1)  # (T, E, L)
        bag_w = w.unsqueeze(1) * in_block.unsqueeze(2).to(w.dtype)  # (T, E, C, L): bag (t, p, c)
        bag_rows = (row.view(T, 1, 1, L) * C + cores.view(1, 1, C, 1)).expand(T, E, C, L)
        out = embedding_bag(table, bag_rows.reshape(-1, L), bag_w.reshape(-1, L), sparse_grad=sparse_grad)
    else:  # keyed bags: each entry read once, added into its (token, block, core) row
        rows = (row.unsqueeze(-1) * C + cores).view(T, L * C)  # (T, L*C)
        t = torch.arange(T, device=row.device).view(T, 1, 1)
        bags = ((t * E + block.unsqueeze(-1)) * C + cores).view(T, L * C)
        out = embedding_bag(
            table, rows, weights.reshape(T, L * C), sparse_grad=sparse_grad, bags=bags, num_bags=T * E * C
        )
    return out.view(T, E, d)


class ImplicitValueExpansion(ServableStore):
    """E·N virtual values from N physical rows: virtual value (p, r) is ``V[r] W_p``.

    Virtual slot id ``v`` (what the addressing chooses, in [0, E·N)) goes through a fixed random
    permutation ``s = perm[v]`` (UltraMem's shuffle: it breaks the tie between a slot's grid position and
    its block), then block ``p = s // N`` and physical row ``r = s % N``.

    ``forward(ids (T, H, k), weights (T, H, k) or (T, H, k, C), x) -> (T, out_dim)`` is
    ``Σ_{h,k} w · V[r] W_p``, computed implicitly: first each token's rows are pooled per block,
    ``P_p = Σ_{slots in block p} w · V[r]`` (one weighted bag over T·E bags), then ``Σ_p P_p W_p``; a token
    costs E·d_v·out_dim of projection instead of projecting the E·N·d_v virtual table. Every chosen slot
    is added, also when two heads choose the same slot or two slots share a physical row and block (the
    lucidrains copy scatters them and keeps one). With C cores (C | d_v) column slice c of each physical
    row is weighted by ``weights[..., c]``, before the projection (bags over the table seen as ``RowSlices``).

    Where the bag runs on the reference (CPU), the pooling is one *keyed* bag: each of a token's H·k entries
    is read once and added into its (token, block) output row. Where it runs on the Triton kernels (CUDA),
    which take fixed-length bags only, each (token, block) bag holds all the token's H·k entries, those of
    other blocks at weight 0: E·H·k rows read per token (H·k of them useful; a keyed Triton bag is to do).

    Init: V ~ N(0, init_std) (None: d_v^-1/2; the UltraMem kind passes the paper's sqrt(E / (2·k·H·L)));
    W_p ~ N(0, (E·d_v)^-1/2), the fan-in of the official code's single projection of the E concatenated
    pools, for which the paper's V init gives the memory output variance 1/(2L).

    Args:
        num_values: N, the physical rows. value_dim: d_v, their width. expansion: E, virtual blocks.
        out_dim: width of the projected output. cores: C, weights per slot (must divide d_v).
        sparse_grad: row-sparse gradients for V (see ``ValueTable``). seed: of the permutation.
        init_std: see above. lr_decay: see ``ValueStore``.
    Parameters: ``weight`` V (N, d_v), role "values"; ``proj`` W (E, d_v, out_dim), role "dense".
    Buffer: ``perm`` (E·N,) int64, persistent.
    """

    def __init__(
        self,
        num_values: int,
        value_dim: int,
        expansion: int,
        out_dim: int,
        cores: int = 1,
        sparse_grad: bool = False,
        seed: int = 0,
        init_std: float | None = None,
        lr_decay: tuple[float, float] | None = None,
    ):
        super().__init__()
        for name, value in (
            ("num_values", num_values),
            ("value_dim", value_dim),
            ("expansion", expansion),
            ("out_dim", out_dim),
            ("cores", cores),
        ):
            if value < 1:
                raise ValueError(f"ImplicitValueExpansion: {name} must be >= 1, got {value}")
        if value_dim % cores:
            raise ValueError(f"ImplicitValueExpansion: cores={cores} must divide value_dim={value_dim}")
        self.num_values, self.value_dim, self.expansion, self.out_dim, self.cores = (
            num_values,
            value_dim,
            expansion,
            out_dim,
            cores,
        )
        self.num_slots = expansion * num_values
        self.sparse_grad, self.init_std, self.lr_decay, self.seed = sparse_grad, init_std, lr_decay, seed
        self.weight = nn.Parameter(torch.empty(num_values, value_dim))
        self.proj = nn.Parameter(torch.empty(expansion, value_dim, out_dim))
        perm = torch.randperm(self.num_slots, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("perm", perm)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.value_dim**-0.5 if self.init_std is None else self.init_std)
        nn.init.normal_(self.proj, std=(self.expansion * self.value_dim) ** -0.5)

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        return {"values": self.value_tables(), "dense": [self.proj]}

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.perm[ids] % self.num_values  # the physical row of each virtual slot (see ``slots``)

    def read_params(self, reads: int) -> int:
        return reads * self.value_dim

    def read_flops(self, reads: int) -> int:
        """The pooling bags, 2 * reads * d_v, and the E block projections, 2 * E * d_v * out_dim."""
        return 2 * reads * self.value_dim + 2 * self.expansion * self.value_dim * self.out_dim

    def signature(self) -> dict:
        return {
            **super().signature(),
            "value_dim": self.value_dim,
            "expansion": self.expansion,
            "cores": self.cores,
        }

    def slots(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (T, H, k) (or (T, L)) virtual -> block (T, L) and physical row (T, L) of each slot, L = H*k."""
        s = self.perm[ids.flatten(1)]  # shuffled ids
        return s // self.num_values, s % self.num_values

    def core_weights(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """weights (T, H, k) or (T, H, k, C) -> (T, L, C) (C = 1: one weight for every core of a slot)."""
        C = weights.shape[-1] if weights.dim() > ids.dim() else 1
        if C != self.cores and C != 1:
            raise ValueError(f"ImplicitValueExpansion: got {C} weights per slot, the store has cores={self.cores}")
        return weights.flatten(1, -2) if weights.dim() > ids.dim() else weights.flatten(1).unsqueeze(-1)

    def pooled(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """ids (T, H, k) virtual, weights (T, H, k[, C]) -> (T, E, d_v): each block's weighted sum of its rows."""
        block, row = self.slots(ids)
        if self.served:  # quantised or offloaded: the distinct rows read, dequantised, on ids' device
            tables, row = self.served_rows(row)
            return pool(tables["weight"], block, row, self.core_weights(ids, weights), self.expansion, False)
        return pool(self.weight, block, row, self.core_weights(ids, weights), self.expansion, self.sparse_grad)

    def forward(self, ids: torch.Tensor, weights: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        pooled = self.pooled(ids, weights).flatten(1)  # (T, E*d_v)
        return pooled @ self.proj.to(pooled.dtype).reshape(-1, self.out_dim)  # (T, out_dim)

    def extra_repr(self) -> str:
        return (
            f"num_values={self.num_values} (x{self.expansion} = {self.num_slots} virtual), value_dim={self.value_dim}, "
            f"out_dim={self.out_dim}, cores={self.cores}, sparse_grad={self.sparse_grad}{self.served_repr()}"
        )
