"""Packaging: every module imports with the declared dependencies; environment.yml agrees with pyproject."""
import ast
import importlib
import pkgutil
import sys
import tomllib
from pathlib import Path

import yaml

import solq

ROOT = Path(__file__).resolve().parents[1]
# import name -> distribution name, where they differ
IMPORT_TO_DIST = {"yaml": "PyYAML", "PIL": "pillow", "sklearn": "scikit-learn", "IPython": "ipython", "zmq": "pyzmq"}


def _all_modules():
    return [m.name for m in pkgutil.walk_packages(solq.__path__, "solq.")]


def test_every_module_imports():
    names = _all_modules()
    assert "solq.config" in names
    for name in names:
        importlib.import_module(name)


def _declared():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = meta["dependencies"] + [d for ds in meta["optional-dependencies"].values() for d in ds]
    return {d.split(">")[0].split("=")[0].split("[")[0].split("<")[0].strip().lower() for d in deps}


def test_every_third_party_import_is_declared():
    declared = _declared()
    stdlib = set(sys.stdlib_module_names)
    missing = set()
    for path in (ROOT / "solq").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top in stdlib or top == "solq" or top in ("triton", "tensorboard"):
                    continue  # triton ships with CUDA torch builds; tensorboard is optional
                dist = IMPORT_TO_DIST.get(top, top).lower()
                if dist not in declared:
                    missing.add(f"{top} ({path.relative_to(ROOT)})")
    assert not missing, f"undeclared imports: {sorted(missing)}"


def test_environment_yml_agrees_with_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = env["dependencies"]
    python = [d for d in deps if isinstance(d, str) and d.startswith("python=")]
    assert python == ["python=3.11"]
    assert meta["requires-python"] == ">=3.10"  # 3.11 satisfies it and is the tested version
    pip_section = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    extras = set(meta["optional-dependencies"])
    # the pip section installs this package with every extra, so the two can never disagree on packages
    assert any(p.replace(" ", "") == f"-e.[{','.join(sorted(extras))}]" for p in pip_section), pip_section
