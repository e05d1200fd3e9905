"""The package: `pip install memlayers` is the layer library on torch alone, the trainer's dependencies are
extras (a missing one is one clear message naming it), and the metadata matches what CI installs."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from memlayers._extras import EXTRA_OF, MissingExtraError, missing_extra, require

REPO = Path(__file__).parent.parent
# every module `pip install memlayers` does not bring (numpy: torch runs without it; triton: CUDA-only speedups)
NOT_INSTALLED = sorted(set(EXTRA_OF) | {"numpy", "triton"})

TORCH_ONLY = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import name` now fails as if it were not installed

import torch
import memlayers

layer = memlayers.MemoryLayer.from_preset("memory_plus", dim=16, n_keys=8, heads=2, topk=4)
opt = memlayers.build_optimizer(layer, lr=1e-2)
loss = layer(torch.randn(2, 5, 16)).pow(2).mean()
loss.backward()
memlayers.clip_grad_norms(layer, max_norm=1.0)
opt.step()
assert isinstance(layer.usage, memlayers.UsageTracker) and layer.usage.summary()["tokens_seen"] == 10
print("TRAINED", loss.detach().item())

try:
    import memlayers.train
except ImportError as e:
    print("LIBRARY:", e)

from memlayers import cli

help = cli.build_parser().format_help()
print("HELP", "COMMAND" in help)
argvs = [["train", "--print-config"], ["eval", "runs/x"], ["compare", "--list"], ["demo", "--steps", "1"]]
if "generate" in help:
    argvs.append(["generate", "runs/x", "a prompt"])
for argv in argvs:
    print("RC", argv[0], cli.main(argv))
"""


def test_import_train_and_cli_with_torch_only(tmp_path):
    """With every optional module blocked: import memlayers, train a MemoryLayer one step; the trainer
    and the commands that need the 'train' extra say so in one line and exit 2."""
    script = TORCH_ONLY.format(blocked=NOT_INSTALLED)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "TRAINED" in out and "HELP True" in out
    assert "LIBRARY: needs the 'train' extra (missing module omegaconf): pip install 'memlayers[train]'" in out
    commands = re.findall(r"^RC (\w+) 2$", out, flags=re.M)
    assert commands[:4] == ["train", "eval", "compare", "demo"] and len(commands) == out.count("RC ")
    errors = [line for line in run.stderr.splitlines() if line.startswith("memlayers ")]
    missing = {"demo": "tqdm"}  # the demo needs only tqdm; the others start with the trainer's configs
    assert errors == [
        f"memlayers {c}: error: needs the 'train' extra (missing module {missing.get(c, 'omegaconf')}): "
        "pip install 'memlayers[train]' (in a clone: pip install -e '.[train]')"
        for c in commands
    ]
    assert "Traceback" not in run.stderr


def test_require(tmp_path, monkeypatch):
    assert require("json") is sys.modules["json"]
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.raises(MissingExtraError, match=re.escape("needs the 'train' extra (missing module tqdm)")) as e:
        require("tqdm")
    assert e.value.extra == "train" and e.value.name == "tqdm" and isinstance(e.value, ImportError)
    with pytest.raises(MissingExtraError, match=re.escape("pip install 'memlayers[all]'")):
        require("tqdm", "all")
    # an installed module whose own import fails keeps its error: it is not a missing extra
    (tmp_path / "broken_mod_xyz.py").write_text("import not_a_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="not_a_module_xyz") as e:
        require("broken_mod_xyz", "train")
    assert not isinstance(e.value, MissingExtraError)


def test_missing_extra_only_names_extras_modules():
    assert missing_extra(ModuleNotFoundError("No module named 'omegaconf'", name="omegaconf")).extra == "train"
    assert missing_extra(ModuleNotFoundError("No module named 'yaml'", name="yaml.nodes")).module == "yaml"
    assert missing_extra(ModuleNotFoundError("No module named 'foo'", name="foo")) is None
    assert missing_extra(ImportError("cannot import name 'x' from 'tqdm'", name="tqdm")) is None  # installed, too old
    assert missing_extra(ValueError("tqdm")) is None


# ----------------------------------------------------------------------------------------------
# metadata


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_ci_pins_satisfy_the_dependencies_and_extras():
    """requirements/ci.txt (what ./dev and CI install, then `pip install --no-deps -e .`) pins a version of
    every requirement of memlayers and its extras (cpu, train, hf, lmeval, test) that the specifiers allow."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO / "requirements/ci.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    assert set(extras) == {"cpu", "train", "hf", "lmeval", "all", "test"}
    for text in project["dependencies"] + sum((extras[e] for e in ("cpu", "train", "hf", "lmeval", "test")), []):
        req = Requirement(text)
        if req.name == "memlayers":  # an extra naming another (test -> train)
            assert req.extras <= set(extras)
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": "test"}):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"requirements/ci.txt pins no version of {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} violates {text!r}"
    assert [Requirement(t).name for t in project["dependencies"]] == ["torch"]  # the layer library: torch only


def test_metadata_names_only_what_exists():
    project = _pyproject()["project"]
    for name in ("PEER", "UltraMem"):  # not implemented yet
        assert name not in project["description"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert "MIT License" in (REPO / "LICENSE").read_text()
    assert (REPO / "memlayers/py.typed").is_file()
    package_data = _pyproject()["tool"]["setuptools"]["package-data"]["memlayers"]
    assert "py.typed" in package_data and "configs/*.yaml" in package_data
    assert sorted((REPO / "memlayers/configs").glob("*.yaml")), "no example configs to ship"


def test_dev_and_ci_keep_the_pinned_flow():
    dev = (REPO / "dev").read_text()
    assert "pip install -q -r requirements/ci.txt" in dev and "pip install -q --no-deps -e ." in dev
    assert "./dev test" in (REPO / ".ci/run").read_text()


def test_readme_install_section():
    readme = (REPO / "README.md").read_text()
    install = readme.split("## Install", 1)[1].split("\n## ", 1)[0]
    for text in ("pip install memlayers", "pip install 'memlayers[train]'", "./dev", "memlayers:"):
        assert text in install, text
    assert readme.index("## Install") < readme.index("## Quick start")


def test_trainer_without_tqdm_names_the_extra(tmp_path):
    script = "import sys; sys.modules['tqdm'] = None\nimport memlayers.train"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        "memlayers._extras.MissingExtraError: needs the 'train' extra (missing module tqdm): "
        "pip install 'memlayers[train]' (in a clone: pip install -e '.[train]')"
    )
