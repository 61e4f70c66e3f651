"""The package's import boundaries, stated as rules and checked on the source and by importing.

1. Only the Caffe layer modules (LAYERS) and the pycaffe-tooling package ``caffe_layers.net``
   import ``caffe``, and they do so at module top (``net.proto`` in a top-level ``try``: the
   one module that lets ``net/`` work without pycaffe), never hidden inside a function.
2. Nothing outside ``caffe_layers.cli`` imports ``argparse``.
3. The numpy core (every module outside LAYERS, ``net``, ``experiment`` and the commands that
   drive Caffe) imports on a machine without Caffe; so do the commands and the inference
   modules of ``net`` (OpenCV engine, image files, slides, comparison); the layer modules and
   the training package do not.
4. No import cycles between the package's modules.
5. Every console script is ``caffe_layers.cli.<name>:main``.
"""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "caffe_layers"
LAYERS = ["augmentation", "data", "mean_subtract"]
# Modules that need pycaffe to import (the training package and what imports it).
CAFFE_COMMANDS = ["experiment"]
# net/ modules that import without pycaffe: Caffe's messages from the shipped descriptor, and inference.
CAFFE_FREE_NET = ["net", "net.proto", "net.caffe_descriptor", "net.prototxt", "net.checks", "net.meanfile",
                  "net.engines", "net.inference", "net.inference.caffe_engine", "net.inference.opencv_engine",
                  "net.inference.engines", "net.inference.image_files", "net.inference.slides",
                  "net.inference.compare"]


def _modules():
    """Dotted name (relative to caffe_layers) -> parsed AST, for every module of the package."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = (path, ast.parse(path.read_text(encoding="utf-8")))
    return modules


def _imports(name, tree, path):
    """(imported top-level names, package-internal dotted modules) of one module, with line numbers."""
    external, internal = [], []
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [p for p in package if p]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            external += [(alias.name.split(".")[0], node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                external.append((node.module.split(".")[0], node))
                continue
            base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
            target = ".".join(base + ([node.module] if node.module else []))
            internal += [(target, node)]
            if not node.module:  # from . import x
                internal += [(".".join(base + [alias.name]), node) for alias in node.names]
    return external, internal


def _is_caffe_owner(name):
    return name in LAYERS or name == "net" or name.startswith("net.")


def test_only_layers_and_net_import_caffe_at_module_top():
    for name, (path, tree) in _modules().items():
        external, _ = _imports(name, tree, path)
        caffe_imports = [node for module, node in external if module == "caffe"]
        if not _is_caffe_owner(name):
            assert not caffe_imports, f"{path}: imports caffe (only {LAYERS} and net/ may)"
            continue
        top_level = {id(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))}
        top_level |= {id(node) for block in tree.body if isinstance(block, ast.Try)
                      for node in block.body if isinstance(node, (ast.Import, ast.ImportFrom))}
        hidden = [node.lineno for node in caffe_imports if id(node) not in top_level]
        assert not hidden, f"{path}: caffe imported inside a function at lines {hidden}"


def test_only_cli_imports_argparse():
    for name, (path, tree) in _modules().items():
        external, _ = _imports(name, tree, path)
        if not (name == "cli" or name.startswith("cli.")):
            assert "argparse" not in [module for module, _ in external], f"{path}: imports argparse"


def test_no_import_cycles():
    modules = _modules()
    graph = {}
    for name, (path, tree) in modules.items():
        _, internal = _imports(name, tree, path)
        # A package __init__ re-exporting its own submodules is not a cycle with them.
        graph[name] = {target for target, _ in internal
                       if target in modules and target != name and not target.startswith(name + ".")}
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for target in graph[node]:
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join(trail + [node, target]))
            if target not in state:
                visit(target, trail + [node])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])


def _import_without_caffe(tmp_path, module):
    (tmp_path / "caffe.py").write_text("raise ImportError('no caffe on this machine')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO_ROOT)]))
    return subprocess.run([sys.executable, "-c", f"import caffe_layers.{module}"], env=env,
                          capture_output=True, text=True, cwd=tmp_path)


def test_core_modules_import_without_caffe(tmp_path):
    core = [name for name in _modules() if name and not _is_caffe_owner(name)
            and name not in CAFFE_COMMANDS and name != "experiment" and not name.startswith("experiment.")]
    assert {"params", "transforms.functional", "stain.histogram", "image_io", "tiling", "reports",
            "cli.normalize", "cli.estimate", "cli.segment", "cli.compare", "cli.train"} <= set(core)
    core += CAFFE_FREE_NET
    for module in core:
        result = _import_without_caffe(tmp_path, module)
        assert result.returncode == 0, f"caffe_layers.{module}: {result.stderr}"


def test_layer_modules_need_caffe(tmp_path):
    for module in LAYERS + ["net.training", "experiment"]:
        result = _import_without_caffe(tmp_path, module)
        assert result.returncode != 0 and "no caffe on this machine" in result.stderr, module


def test_console_scripts_are_cli_modules():
    setup = (REPO_ROOT / "setup.py").read_text()
    commands = re.search(r'for command in \(([^)]*)\)', setup).group(1)
    names = re.findall(r'"([a-z]+)"', commands)
    assert len(names) == 11
    modules = _modules()
    for name in names:
        path, tree = modules[f"cli.{name}"]
        functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert "main" in functions, f"{path} has no main()"
