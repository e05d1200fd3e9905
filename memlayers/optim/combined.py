"""Several optimizers stepped as one."""

import contextlib
from collections import OrderedDict

import torch


def optimizer_parts(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """A ``CombinedOptimizer``'s parts, or ``[optimizer]``."""
    return list(getattr(optimizer, "optimizers", [optimizer]))


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped as one, so LR schedulers, clipping and checkpoints see one object.

    ``param_groups`` is the concatenation of the parts' groups (the same dicts), so a scheduler
    that sets ``group["lr"]`` drives every part.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        # Optimizer.__init__ would copy the groups; we want to share the parts' own dicts.
        self.optimizers = list(optimizers)
        self.defaults = {}
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self):
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for opt in self.optimizers:
            opt.step()
        return loss

    @contextlib.contextmanager
    def accumulate(self):
        """Every part's ``accumulate()`` (the fused value update's; see ``FusedRowOptimizer``) at once."""
        with contextlib.ExitStack() as stack:
            for opt in self.optimizers:
                if hasattr(opt, "accumulate"):
                    stack.enter_context(opt.accumulate())
            yield

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        parts = state_dict.get("optimizers")
        if parts is None or len(parts) != len(self.optimizers):
            raise ValueError(
                f"CombinedOptimizer.load_state_dict: expected states for {len(self.optimizers)} optimizers, "
                f"got {None if parts is None else len(parts)}; was the checkpoint saved with another value_optimizer?"
            )
        for opt, part in zip(self.optimizers, parts):
            opt.load_state_dict(part)

    def __repr__(self) -> str:
        return "CombinedOptimizer(\n" + "\n".join(repr(opt) for opt in self.optimizers) + "\n)"
