"""Optional dependencies ("extras"): ``pip install memlayers`` is the layer library and needs only torch.

    pip install 'memlayers[train]'   # tqdm, omegaconf, pyyaml, matplotlib, safetensors: train/eval/export/...
    pip install 'memlayers[hf]'      # transformers, accelerate, safetensors, peft: memlayers.integrations.hf,
                                     # the LoRA arm of memlayers experiment continual
    pip install 'memlayers[lmeval]'  # lm-evaluation-harness: memlayers lm-eval, memlayers.integrations.lmeval
    pip install 'memlayers[all]'     # train + hf + lmeval + tensorboard

Code that needs one of those modules imports it through ``require`` (or lets ``missing_extra`` turn the
ImportError into one), so that a missing extra is one clear message naming the extra to install.
"""

import importlib
from types import ModuleType

# top-level module -> the extra that installs it (see pyproject.toml's [project.optional-dependencies])
EXTRA_OF = {
    "tqdm": "train",
    "omegaconf": "train",
    "yaml": "train",
    "matplotlib": "train",
    "safetensors": "train",
    "tensorboard": "all",
    "transformers": "hf",
    "accelerate": "hf",
    "peft": "hf",
    "lm_eval": "lmeval",
}


class MissingExtraError(ImportError):
    """A module of an extra is not installed; the message says which extra to install."""

    def __init__(self, module: str, extra: str):
        super().__init__(
            f"needs the {extra!r} extra (missing module {module}): pip install 'memlayers[{extra}]' "
            f"(in a clone: pip install -e '.[{extra}]')",
            name=module,
        )
        self.module, self.extra = module, extra


def require(module: str, extra: str | None = None) -> ModuleType:
    """Import and return ``module``; if it is not installed, raise ``MissingExtraError`` naming ``extra``
    (default: the extra that installs it, ``EXTRA_OF``). A module that is installed but fails to import
    for another reason keeps its own error."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = missing_extra(e, extra)
        if missing is None or missing.module != module.split(".")[0]:
            raise
        raise missing from e


def missing_extra(error: BaseException, extra: str | None = None) -> MissingExtraError | None:
    """``error`` as a ``MissingExtraError`` when it says that a module an extra installs is not installed
    (a module of ``EXTRA_OF``, or any module when ``extra`` is given), else None."""
    if isinstance(error, MissingExtraError):
        return error
    if not isinstance(error, ModuleNotFoundError) or not error.name:  # not "cannot import name X from Y"
        return None
    top = error.name.split(".")[0]
    if extra is None and top not in EXTRA_OF:
        return None
    return MissingExtraError(top, extra or EXTRA_OF[top])
