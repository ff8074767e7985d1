"""The package's layers import downwards only: the import graph of diffjax/, read with `ast`.

    core            (diffusion maths: nothing else of diffjax)
    utilities       paths, images, tokenizer, hugepages, cpu_flags
    models
    conditioning    (the one place that knows the kinds of conditioning)
    bundle          (DiffusionModel)
    data, parallel, distributed
    io              (checkpoints, the .pt reader, convert, pretrained, load / save)
    pipelines       (sampling, training, evaluation)
    cli, compat     (leaves: only cli and io's converters import compat; nothing imports cli)
    diffjax/__init__.py (the public API: it may import any layer)

Also: no function-level import of a diffjax module (it would hide a cycle), and no module reads an
environment variable at import time.
"""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "diffjax"

LAYERS = [
    ("core", ["diffjax.core"]),
    ("utilities", ["diffjax.paths", "diffjax.images", "diffjax.tokenizer", "diffjax.hugepages",
                   "diffjax.cpu_flags"]),
    ("models", ["diffjax.models"]),
    ("conditioning", ["diffjax.conditioning"]),
    ("bundle", ["diffjax.bundle"]),
    ("data", ["diffjax.data", "diffjax.parallel", "diffjax.distributed"]),
    ("io", ["diffjax.io"]),
    ("pipelines", ["diffjax.pipelines"]),
    ("leaves", ["diffjax.cli", "diffjax.compat", "diffjax.__main__"]),
]
# compat is a leaf of the library: only the command line and io's converters may use it.
COMPAT_USERS = ("diffjax.cli", "diffjax.io.convert", "diffjax.io.legacy", "diffjax.io.pretrained",
                "diffjax.compat", "diffjax.__main__")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(name: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{name} belongs to no layer: add it to LAYERS in {__file__}")


def imports(path: pathlib.Path):
    """(imported diffjax module, line, inside a function?) of every import in a file."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    functions = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            # `from diffjax import data` imports the module diffjax.data
            names = [f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base
                     for a in node.names]
        else:
            continue
        for name in names:
            if name == "diffjax" or name.startswith("diffjax."):
                yield name, node.lineno, id(node) in functions


def _is_module(name: str) -> bool:
    rel = pathlib.Path(*name.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").is_file() or (PACKAGE.parent / rel).is_dir()


FILES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    for path in FILES:
        if path != PACKAGE / "__init__.py":
            layer_of(module_name(path))


def test_imports_point_down_only():
    back_edges = []
    for path in FILES:
        source = module_name(path)
        if source == "diffjax":  # the public API sits on top of everything
            continue
        for target, line, _ in imports(path):
            if target == "diffjax":
                back_edges.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports the "
                                  f"package root (the public API): import the module instead")
                continue
            if layer_of(target) > layer_of(source) and not (
                    target.startswith("diffjax.compat") and source.startswith(COMPAT_USERS)):
                back_edges.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {source} "
                                  f"({LAYERS[layer_of(source)][0]}) imports {target} "
                                  f"({LAYERS[layer_of(target)][0]})")
            if target.startswith("diffjax.compat") and not source.startswith(COMPAT_USERS):
                back_edges.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {source} imports "
                                  f"{target}: only the command line and io's converters use compat")
            if target.startswith(("diffjax.cli", "diffjax.__main__")) and \
                    not source.startswith(("diffjax.cli", "diffjax.__main__")):
                back_edges.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {source} imports "
                                  f"the command line ({target})")
    assert not back_edges, "imports against the layers:\n" + "\n".join(back_edges)


def test_no_function_level_imports_of_diffjax_modules():
    late = [f"{path.relative_to(PACKAGE.parent)}:{line} ({target})"
            for path in FILES for target, line, inside in imports(path) if inside]
    assert not late, "diffjax modules imported inside functions (they hide cycles):\n" + "\n".join(late)


def _reads_environment(node) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and sub.attr in ("environ", "getenv") and \
                isinstance(sub.value, ast.Name) and sub.value.id == "os":
            return True
    return False


def test_no_environment_read_at_import_time():
    found = []
    for path in FILES:
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module-level statements only (function bodies run later)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                # defaults and decorators are evaluated at import time too
                suspects = [*getattr(node, "decorator_list", []),
                            *(node.args.defaults + node.args.kw_defaults
                              if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else [])]
                if isinstance(node, ast.ClassDef):
                    suspects += [n for n in node.body if not isinstance(
                        n, (ast.FunctionDef, ast.AsyncFunctionDef))]
                if any(s is not None and _reads_environment(s) for s in suspects):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
            elif _reads_environment(node):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not found, "environment read at import time:\n" + "\n".join(found)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_modules_are_short_or_say_why(path):
    """About 500 lines at most, unless the module's docstring gives the reason."""
    lines = len(path.read_text().splitlines())
    if lines > 520:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert "lines" in doc and "because" in doc.lower(), (
            f"{path.name} has {lines} lines: split it, or say at its top why it is one module "
            f"(a sentence with 'lines' and 'because')")
