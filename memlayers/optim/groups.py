"""Parameter groups from the roles memory parts declare."""

from torch import nn

from ..memory.layer import MemoryLayer
from ..memory.parts import MemoryPart, ValueStore


def _unique(params):
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def parameter_roles(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """{"keys": [...], "values": [...]}: the parameters memory parts declare in those roles, each once
    (a shared pool counts once). Everything else is "dense"."""
    roles: dict[str, list] = {"keys": [], "values": []}
    for m in model.modules():
        if isinstance(m, MemoryPart):
            for role, params in m.param_roles().items():
                if role in roles:
                    roles[role].extend(params)
    return {role: _unique(params) for role, params in roles.items()}


def value_stores(model: nn.Module) -> list[ValueStore]:
    """Every value store registered in ``model`` (a shared pool counts once)."""
    return _unique(m for m in model.modules() if isinstance(m, ValueStore))


def value_parameters(model: nn.Module) -> list[nn.Parameter]:
    return parameter_roles(model)["values"]


def check_pools_registered(model: nn.Module) -> None:
    """Raise if a memory layer of ``model`` reads a store that ``model`` does not hold (it would not be
    trained, moved or saved)."""
    held = {id(m) for m in model.modules()}
    for name, m in model.named_modules():
        if isinstance(m, MemoryLayer) and id(m.store.root()) not in held:
            raise ValueError(
                f"memory layer {name or 'model'!r} reads a shared pool that the model does not hold, so it would "
                "not be trained or saved: register the pool in the model (e.g. self.pool = pool)"
            )


def lr_decay_scale(decay: tuple[float, float] | None, step: int, total: int) -> float:
    """The multiplier of a group's lr at ``step`` of ``total`` for ``decay = (start, fraction)``: ``start``
    at step 0, falling linearly to 1 at ``fraction * total`` and 1 after (UltraMem's value lr decay); 1 for None."""
    if decay is None:
        return 1.0
    start, fraction = decay
    return 1.0 + (start - 1.0) * max(0.0, 1.0 - step / max(1.0, fraction * total))


def param_groups(
    model: nn.Module, lr: float, weight_decay: float = 0.1, value_lr: float | None = None, value_lr_ratio: float = 10.0
) -> list[dict]:
    """Parameter groups, each with a ``name``, from the roles the memory parts declare:

    * ``decay``: matrices (dim >= 2) other than values and keys, at ``lr`` with ``weight_decay``;
    * ``no_decay``: biases and norm gains, at ``lr``;
    * ``subkeys``: addressing keys (product-key and Tucker tables), at ``lr``, no decay;
    * ``values``: value tables, at ``value_lr`` (default ``value_lr_ratio * lr``), no decay; stores with
      an lr decay (UltraMem) get their own ``values`` group at ``value_lr / start`` carrying ``lr_decay =
      (start, fraction)``: the trainer scales it by ``lr_decay_scale``, so it starts at ``value_lr`` and
      falls to ``value_lr / start`` (with the default ratio 10 and start 10: UltraMem's 10x -> 1x lr).

    Empty groups are left out.
    """
    check_pools_registered(model)
    roles = parameter_roles(model)
    values, subkeys = roles["values"], roles["keys"]
    special = {id(p) for p in values + subkeys}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in special]
    value_lr = value_lr if value_lr is not None else value_lr_ratio * lr
    by_decay: dict = {}
    for store in value_stores(model):
        for p in store.param_roles().get("values", []):
            by_decay.setdefault(store.lr_decay, []).append(p)
    value_groups = [  # a decaying store peaks at value_lr and falls to value_lr / start (UltraMem: 10x -> 1x lr)
        dict(name="values", params=[p for p in _unique(ps) if p.requires_grad], lr=value_lr, weight_decay=0.0)
        | ({} if decay is None else {"lr": value_lr / decay[0], "lr_decay": decay})
        for decay, ps in by_decay.items()
    ]
    grouped = {id(p) for g in value_groups for p in g["params"]}
    orphans = [p for p in values if p.requires_grad and id(p) not in grouped]  # values of parts that are not stores
    if orphans:
        value_groups.insert(0, dict(name="values", params=orphans, lr=value_lr, weight_decay=0.0))
    groups = [
        dict(name="decay", params=[p for p in rest if p.dim() >= 2], lr=lr, weight_decay=weight_decay),
        dict(name="no_decay", params=[p for p in rest if p.dim() < 2], lr=lr, weight_decay=0.0),
        dict(name="subkeys", params=[p for p in subkeys if p.requires_grad], lr=lr, weight_decay=0.0),
        *value_groups,
    ]
    return [g for g in groups if g["params"]]
