"""mkdocs hooks: the benchmark plots as site files, and a complete API reference.

Also a griffe extension (``loss_class_signatures``, named in mkdocs.yml) that
gives the loss classes their constructor signature.

Imports only the standard library at module level (pytest imports every .py
file under docs/ for its doctests).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def public_names() -> list[str]:
    """``jxent.__all__``, read from the source without importing jax."""
    tree = ast.parse((ROOT / "jxent" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    raise ValueError("jxent/__init__.py defines no __all__")


def on_files(files, config):
    """Adds the committed benchmark plots as ``benchmarks/<device>/<name>.png``."""
    from mkdocs.structure.files import File

    for png in sorted(RESULTS.glob("*/*.png")):
        uri = f"benchmarks/{png.parent.name}/{png.name}"
        files.append(File.generated(config, uri, abs_src_path=str(png)))
    return files


def on_page_content(html, page, config, files):
    """Fails the build unless the API page documents every name in __all__."""
    if page.file.src_uri == "api.md":
        missing = [n for n in public_names() if f'id="jxent.{n}"' not in html]
        if missing:
            from mkdocs.exceptions import PluginError

            raise PluginError(f"API reference lacks jxent.{missing} (in __all__)")
    return html


def loss_class_signatures():
    """A griffe extension: constructor signatures for classes without ``__init__``.

    The loss classes get their ``__init__`` from ``dataclasses`` inside a
    decorator that static analysis does not see through, so the API page would
    show neither their signature nor their arguments' types. For each class of
    the package without an ``__init__`` in its source, this reads the
    constructor's signature from the imported class (``inspect.signature``)
    and adds it as ``__init__``, with the annotations of the class's fields.
    mkdocs.yml names this factory in mkdocstrings' ``extensions`` option.
    """
    import importlib
    import inspect

    import griffe

    kinds = {
        inspect.Parameter.POSITIONAL_ONLY: griffe.ParameterKind.positional_only,
        inspect.Parameter.POSITIONAL_OR_KEYWORD: (
            griffe.ParameterKind.positional_or_keyword
        ),
        inspect.Parameter.VAR_POSITIONAL: griffe.ParameterKind.var_positional,
        inspect.Parameter.KEYWORD_ONLY: griffe.ParameterKind.keyword_only,
        inspect.Parameter.VAR_KEYWORD: griffe.ParameterKind.var_keyword,
    }

    def add_init(cls: griffe.Class) -> None:
        module = importlib.import_module(cls.module.path)
        runtime = getattr(module, cls.name, None)
        if not inspect.isclass(runtime) or "__init__" not in vars(runtime):
            return
        plain = griffe.ParameterKind.positional_or_keyword
        params = [griffe.Parameter("self", kind=plain)]
        for p in inspect.signature(runtime).parameters.values():
            field = cls.members.get(p.name)
            annotation = field.annotation if field is not None else None
            if annotation is None and p.annotation is not inspect.Parameter.empty:
                annotation = str(p.annotation)
            if p.default is inspect.Parameter.empty:
                default = None
            elif isinstance(p.default, str) and '"' not in p.default:
                default = f'"{p.default}"'  # as the functions' signatures quote
            else:
                default = repr(p.default)
            params.append(
                griffe.Parameter(
                    p.name, annotation=annotation, kind=kinds[p.kind], default=default
                )
            )
        init = griffe.Function(
            "__init__",
            parameters=griffe.Parameters(*params),
            returns="None",
            parent=cls,
        )
        cls.set_member("__init__", init)

    def visit(obj: griffe.Module | griffe.Class) -> None:
        for member in obj.members.values():
            if member.is_alias:
                continue
            if member.is_class and "__init__" not in member.members:
                add_init(member)
            if member.is_module or member.is_class:
                visit(member)

    class LossClassSignatures(griffe.Extension):
        def on_package(self, *, pkg: griffe.Module, **kwargs: object) -> None:
            visit(pkg)

    return LossClassSignatures()
