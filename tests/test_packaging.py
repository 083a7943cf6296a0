"""The three install routes agree: pyproject.toml (pip), the Makefile's torch pins, environment.yml (conda + pip).

A version range changed in one file and not in the others fails here, not on somebody's GPU machine.
"""
import re
import tomllib
from pathlib import Path

import pytest
import yaml  # PyYAML: a dependency of timm
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).parents[1]
TORCH = {"torch", "torchvision"}   # pinned to the Makefile's versions in environment.yml, ranges in pyproject


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pyproject_requirements() -> dict[str, SpecifierSet]:
    project = _pyproject()["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    reqs = [Requirement(line) for line in lines]
    return {canonicalize_name(r.name): r.specifier for r in reqs}


def _environment():
    """(conda requirements, pip requirements, pip option lines, python spec, channels) of environment.yml."""
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda, pip, options, python = {}, {}, [], None
    for entry in env["dependencies"]:
        if isinstance(entry, dict):
            for line in entry["pip"]:
                if line.startswith("-"):
                    options.append(line)
                else:
                    r = Requirement(line)
                    pip[canonicalize_name(r.name)] = r.specifier
        elif entry == "pip":
            continue
        else:
            name, spec = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", entry).groups()
            if name == "python":
                python = spec.lstrip("=")
            else:
                conda[canonicalize_name(name)] = SpecifierSet(spec)
    return conda, pip, options, python, env["channels"]


def _makefile_torch() -> dict[str, str]:
    """The versions of TORCH_INSTALL's default in the Makefile, e.g. {"torch": "2.13.0", ...}."""
    line = re.search(r"^TORCH_INSTALL \?= (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    pins = dict(re.findall(r"([A-Za-z0-9_-]+)==(\S+)", line))
    assert set(pins) == TORCH, line
    return pins


def test_every_pyproject_dependency_is_in_environment_yml_with_the_same_range():
    conda, pip, _, _, _ = _environment()
    assert not set(conda) & set(pip), "a package listed twice in environment.yml"
    env = {**conda, **pip}
    wanted = {n: s for n, s in _pyproject_requirements().items() if n not in TORCH}
    assert {n: str(env.get(n)) for n in wanted} == {n: str(s) for n, s in wanted.items()}
    assert set(env) - TORCH == set(wanted), "environment.yml installs something pyproject.toml does not list"


def test_torch_is_the_makefiles_pin_inside_pyprojects_range():
    conda, pip, _, _, _ = _environment()
    ranges = _pyproject_requirements()
    for name, version in _makefile_torch().items():
        assert name not in conda, f"{name} from conda: PyTorch publishes no conda packages for recent releases"
        assert str(pip[name]) == f"=={version}"
        assert Version(version) in ranges[name], f"the Makefile's {name}=={version} is outside pyproject's range"


def test_environment_is_conda_forge_plus_the_cuda_wheel_index_the_makefile_suggests():
    conda, pip, options, python, channels = _environment()
    assert channels[0] == "conda-forge" and not {"pytorch", "nvidia"} & set(channels)
    assert not {"pytorch", "pytorch-cuda"} & set(conda)
    suggested = re.search(r"--index-url (\S+)\"", (ROOT / "Makefile").read_text()).group(1)
    assert options == [f"--extra-index-url {suggested}"]   # extra: timm and the rest still come from PyPI
    assert Version(python) in SpecifierSet(_pyproject()["project"]["requires-python"])


# (package, the first version with an API the code needs, the release before it): np.trapezoid,
# zarr's atomic chunk writes (cache/store.py's resumption), torch.serialization.safe_globals (checkpoints.py).
@pytest.mark.parametrize("name, first, before", [("numpy", "2.0", "1.26"), ("zarr", "3.1.3", "3.1.2"),
                                                 ("torch", "2.5", "2.4")])
def test_minimums_cover_the_apis_used(name, first, before):
    spec = _pyproject_requirements()[name]
    assert Version(first) in spec and Version(before) not in spec, spec


def test_console_command_is_the_pipeline_group():
    """`jei-dnn` (pyproject's console script) is `python pipeline.py`, and pip installs every package."""
    import importlib
    import subprocess
    import sys

    import pipeline

    module, attr = _pyproject()["project"]["scripts"]["jei-dnn"].split(":")
    assert getattr(importlib.import_module(module), attr) is pipeline.cli
    include = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages == {name.rstrip("*") for name in include}
    exe = Path(sys.executable).parent / "jei-dnn"
    if exe.exists():          # `make install` installed the project (pip install -e): the command runs the group
        run = [subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True).stdout
               for cmd in ([str(exe), "--help"], [sys.executable, "pipeline.py", "--help"])]
        assert run[0].replace("jei-dnn", "pipeline.py", 1) == run[1] and "sweep" in run[0]
