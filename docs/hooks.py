"""mkdocs hooks: the benchmark plots as site files, and a complete API reference.

Also: included files' headings nest under the heading that includes them;
console examples (``>>>``) are highlighted as such, so that the copy button
leaves out their prompts and outputs (with docs/css/code.css); and a griffe
extension (``loss_class_signatures``, named in mkdocs.yml) that gives the loss
classes their constructor signature.

Imports only the standard library at module level (pytest imports every .py
file under docs/ for its doctests).
"""

from __future__ import annotations

import ast
import re
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


_FENCE = re.compile(r"^(`{3,}|~{3,})(.*)$")
_HEADING = re.compile(r"^(#{1,6})(\s.*)$")
_SNIPPET = re.compile(r'^--8<-- "([^":]+)"\s*$')


def _lines_outside_fences(lines: list[str]):
    """Yields ``(index, line)`` for the lines not inside a fenced code block."""
    fence = None
    for i, line in enumerate(lines):
        match = _FENCE.match(line)
        if fence is None:
            if match:
                fence = match.group(1)
            else:
                yield i, line
        elif match and match.group(1).startswith(fence) and not match.group(2):
            fence = None


def demote_headings(markdown: str, levels: int) -> str:
    r"""Moves every heading down ``levels`` levels (at most to 6).

    Lines in fenced code blocks are not headings.

    >>> demote_headings("# Title\n```bash\n# comment\n```\n## Part", 2)
    '### Title\n```bash\n# comment\n```\n#### Part'
    """
    lines = markdown.split("\n")
    for i, line in _lines_outside_fences(lines):
        if heading := _HEADING.match(line):
            depth = min(len(heading.group(1)) + levels, 6)
            lines[i] = "#" * depth + heading.group(2)
    return "\n".join(lines)


def include_nested(markdown: str, base: Path = ROOT) -> str:
    """Expands ``--8<-- "file"`` lines, the file's headings below the including one.

    A file included under a level-2 heading has its ``#`` headings turned into
    level 3, ``##`` into level 4, and so on, so that the page keeps one h1 and
    its table of contents lists every section. (pymdownx.snippets would
    include the file verbatim; it sees no such lines any more.)
    """
    lines = markdown.split("\n")
    level = 0
    for i, line in _lines_outside_fences(list(lines)):
        if heading := _HEADING.match(line):
            level = len(heading.group(1))
        elif snippet := _SNIPPET.match(line):
            path = base / snippet.group(1)
            if not path.is_file():
                from mkdocs.exceptions import PluginError

                raise PluginError(f"Included file {path} does not exist")
            lines[i] = demote_headings(path.read_text().rstrip("\n"), level)
    return "\n".join(lines)


def console_fences(markdown: str) -> str:
    r"""Marks fenced ``python`` blocks that start with ``>>>`` as ``pycon``.

    Pygments' console lexer tags the prompts (``.gp``) and outputs (``.go``),
    which docs/css/code.css keeps out of the copy button's text.

    >>> console_fences("```python\n>>> 1 + 1\n2\n```\n```python\nx = 1\n```")
    '```pycon\n>>> 1 + 1\n2\n```\n```python\nx = 1\n```'
    """
    lines = markdown.split("\n")
    fence = None
    for i, line in enumerate(lines):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            body = next((x for x in lines[i + 1 :] if x.strip()), "")
            if match.group(2).strip() == "python" and body.startswith(">>>"):
                lines[i] = fence + "pycon"
        elif fence is not None and match and not match.group(2):
            fence = None
    return "\n".join(lines)


def on_page_markdown(markdown, page, config, files):
    """Nested included files and ``pycon`` console examples (see above)."""
    return console_fences(include_nested(markdown))


# A console output line's newline goes inside its span, so that hiding the
# output while copying (docs/css/code.css) leaves no blank line behind.
_OUTPUT_LINE = re.compile(r'(<span class="go">[^<]*)</span>\n')


def on_page_content(html, page, config, files):
    """Console outputs' newlines inside their spans; a complete API page.

    Fails the build unless the API page documents every name in __all__.
    """
    html = _OUTPUT_LINE.sub("\\1\n</span>", html)
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
