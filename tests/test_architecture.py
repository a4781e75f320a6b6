"""Structure checks (issue 10): no private names across modules, small estimator modules."""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "moelab"


def _module_exists(pkg: Path, name: str) -> bool:
    return (pkg / f"{name}.py").exists() or (pkg / name / "__init__.py").exists()


def private_imports(source: str, path: Path) -> list:
    """`from .x import _y` (or `from moelab.x import _y`) in a moelab module whose ``_y`` is not a module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0 and not (node.module or "").startswith("moelab"):
            continue
        base = ROOT.parent if node.level == 0 else path.parent
        for _ in range(max(node.level - 1, 0)):
            base = base.parent
        target = base.joinpath(*node.module.split(".")) if node.module else base
        for alias in node.names:
            n = alias.name
            if n.startswith("_") and not n.startswith("__") and not _module_exists(target, n):
                found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} imports {n} from {node.module or '.'}")
    return found


def test_no_module_imports_a_private_name_from_another_module():
    """Package-private *modules* (``from . import _fused``) are fine; private names are not."""
    offenders = [o for p in sorted(ROOT.rglob("*.py")) for o in private_imports(p.read_text(), p)]
    assert not offenders, "private names imported across modules:\n" + "\n".join(offenders)


def test_the_check_can_fail():
    assert private_imports("from .em import _e_step\n", ROOT / "mle.py") == ["moelab/mle.py:1 imports _e_step from em"]
    assert private_imports("from ..mstep import _x, y\n", ROOT / "studies" / "a.py") == ["moelab/studies/a.py:1 imports _x from mstep"]
    assert private_imports("from . import _fused\nfrom ._scaling import Scaling\nfrom torch import _C\n", ROOT / "em.py") == []


def test_em_module_is_small():
    assert len((ROOT / "em.py").read_text().splitlines()) <= 400


def _run(code: str):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(ROOT.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_import_moelab_nn_loads_no_pandas_or_sklearn():
    r = _run("import sys, moelab.nn; assert 'pandas' not in sys.modules and 'sklearn' not in sys.modules, "
             "sorted(m for m in sys.modules if m.split('.')[0] in ('pandas', 'sklearn'))[:5]")
    assert r.returncode == 0, r.stderr


def test_version_imports_no_torch():
    r = _run("import sys; from moelab.cli import main; assert main(['--version']) == 0; assert 'torch' not in sys.modules")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "moelab 0.1.0"


def test_lazy_names_resolve():
    import moelab

    for name in moelab.__all__:
        assert getattr(moelab, name) is not None
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        moelab.nope


def test_tiny_floor_per_dtype():
    """Floors stay 1e-300 in float64 (results unchanged) and never underflow to 0 in float32."""
    import torch

    from moelab._validation import tiny

    assert tiny(torch.float64) == 1e-300
    assert torch.tensor(1e-300, dtype=torch.float32) == 0  # why a fixed 1e-300 was wrong there
    assert torch.tensor(tiny(torch.float32), dtype=torch.float32) > 0
    assert torch.tensor(tiny(torch.float16), dtype=torch.float16) > 0


FITTING_MODULES = ("em", "mle", "fitcore", "options", "mstep", "init", "_fused", "_scaling", "_validation", "lse", "regression")


def test_no_module_level_mutable_state_in_the_fitting_code():
    """Issue 10: no dicts, lists or sets in module globals; _fused's caches live in one KernelCache."""
    import importlib

    found = []
    files = []
    for name in FITTING_MODULES:  # a package (moelab/_fused/) counts with all its modules
        pkg = ROOT / name
        if pkg.is_dir():
            files += [(f"{name}.{f.stem}" if f.stem != "__init__" else name, f) for f in sorted(pkg.glob("*.py"))]
        else:
            files.append((name, ROOT / f"{name}.py"))
    assert len(files) > len(FITTING_MODULES)
    for name, path in files:
        mod = importlib.import_module(f"moelab.{name}")
        tree = ast.parse(path.read_text())
        assigned = [t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)]
        for k in assigned:  # names the module itself binds (imports, e.g. the gate registry, are their owners' business)
            v = getattr(mod, k)
            if not k.startswith("__") and type(v) in (dict, list, set, bytearray):
                found.append(f"moelab.{name}.{k}: {type(v).__name__}")
    assert not found, "module-level mutable state:\n" + "\n".join(found)


def test_kernel_cache_methods():
    from moelab import _fused

    cache = _fused.KernelCache()
    key = (3, 1, "torch.float64", "cpu")
    assert not cache.is_broken(key)
    cache.mark_broken(key, "no compiler")
    assert cache.is_broken(key)
    cache.clear()
    assert not cache.is_broken(key) and not cache.failed("em_sums")
    assert isinstance(_fused.kernels, _fused.KernelCache)


def test_the_two_command_lines_do_not_import_each_other():
    """Issue 10: CLIError/user_errors live in moelab._cli_errors, so moelab.studies.cli does not import moelab.cli."""
    r = _run("import sys, moelab.studies.cli; assert 'moelab.cli' not in sys.modules; "
             "from moelab.cli import CLIError; from moelab._cli_errors import CLIError as E; assert CLIError is E")
    assert r.returncode == 0, r.stderr
    src = (ROOT / "studies" / "cli.py").read_text()
    assert "from ..cli import" not in src and "moelab.cli import" not in src


def test_a_clone_named_moelab_in_the_working_directory_is_not_imported(tmp_path):
    """src layout (issue 15 item 7): run from the folder above a clone called ``moelab``, Python must
    import the package (src/moelab), not the clone's folder as a namespace package."""
    clone = tmp_path / "moelab"
    (clone / "src").mkdir(parents=True)
    (clone / "tests").mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", "import moelab; print(moelab.__file__); moelab.fit_em"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve() == (ROOT / "__init__.py").resolve()
