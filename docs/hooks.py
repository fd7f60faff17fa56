"""mkdocs hooks: the benchmark plots as site files, and a complete API reference.

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
