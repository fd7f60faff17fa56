"""The documentation site, built once with ``mkdocs build --strict`` and read.

Every public name's API entry shows one readable signature, its arguments, one
return value and an example; no Sphinx markup survives; every page has one h1
and a table of contents that lists all its sections; console examples are
highlighted so that the copy button leaves out prompts and outputs (and, where
a Chromium is installed, a real click on the copy button proves it).
"""

from __future__ import annotations

import html
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import jxent

ROOT = Path(__file__).resolve().parents[1]
LOSS_CLASSES = [n for n in jxent.__all__ if inspect.isclass(getattr(jxent, n))]
FUNCTIONS = [n for n in jxent.__all__ if inspect.isfunction(getattr(jxent, n))]
CALLABLES = LOSS_CLASSES + FUNCTIONS


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("the docs site needs mkdocs: pip install -e '.[test]'")
    if not (ROOT / "benchmarks" / "results").is_dir():
        pytest.skip("the benchmarks page includes result files that an sdist lacks")
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    # The jxent documented is this tree's (the hooks import it for signatures).
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH")) if p
    )
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", out],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    return out


def pages(site: Path) -> dict[str, str]:
    return {
        str(p.relative_to(site)): p.read_text()
        for p in sorted(site.rglob("*.html"))
        if p.name != "404.html"
    }


def text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


def entries(site: Path) -> dict[str, str]:
    """The API page's entry of each documented object, by name."""
    page = (site / "api" / "index.html").read_text()
    chunks = re.split(r'(?=<div class="doc doc-object doc-(?!module)[\w-]+">)', page)
    found = {}
    for chunk in chunks[1:]:
        name = re.search(r'<h2 id="jxent\.(\w+)"', chunk)
        assert name, chunk[:300]
        found[name.group(1)] = chunk
    return found


def sections(entry: str) -> dict[str, str]:
    """The entry's docstring sections (Parameters, Returns, ...), by title."""
    parts = re.split(r'<span class="doc-section-title">([\w ]+):</span>', entry)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def section_items(section: str) -> int:
    return len(re.findall(r'class="doc-section-item', section))


def signatures(entry: str) -> list[str]:
    blocks = re.findall(r'<div class="doc-signature[^"]*">(.*?)</div>', entry, re.S)
    return [text(b).strip() for b in blocks]


def test_every_public_name_has_one_entry(site):
    assert sorted(entries(site)) == sorted(jxent.__all__)


def test_no_sphinx_markup(site):
    roles = re.compile(r":(?:func|class|data|meth|mod|attr|obj|exc|py:\w+):`?")
    found = {
        path: roles.findall(text(content))
        for path, content in pages(site).items()
        if roles.search(text(content))
    }
    search = (site / "search" / "search_index.json").read_text()
    assert not found and not roles.search(search), found


@pytest.mark.parametrize("name", CALLABLES)
def test_one_readable_signature(site, name):
    (signature,) = signatures(entries(site)[name])
    assert signature.startswith(name + "(")
    # Formatted (ruff or black): no line wider than the content column.
    assert max(len(line) for line in signature.splitlines()) <= 80, signature
    runtime = inspect.signature(getattr(jxent, name))
    for param in runtime.parameters:
        assert re.search(rf"\b{param}\b", signature), (param, signature)


@pytest.mark.parametrize("name", CALLABLES)
def test_arguments_listed(site, name):
    parameters = sections(entries(site)[name])["Parameters"]
    runtime = inspect.signature(getattr(jxent, name))
    listed = re.findall(r"<code>(\w+)</code>", parameters)
    assert [p for p in runtime.parameters if p in listed] == list(runtime.parameters)
    assert section_items(parameters) == len(runtime.parameters)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_one_return_value(site, name):
    returns = sections(entries(site)[name])["Returns"]
    assert section_items(returns) == 1, text(returns)


@pytest.mark.parametrize("name", CALLABLES)
def test_example(site, name):
    examples = sections(entries(site)[name])["Examples"]
    assert '<span class="gp">&gt;&gt;&gt; </span>' in examples
    assert f"jxent.{name}(" in text(examples)


def test_other_public_names_are_described(site):
    """Public names that are neither classes nor functions (type aliases)."""
    found = entries(site)
    for name in set(jxent.__all__) - set(CALLABLES):
        assert "doc-contents" in found[name] and "<p>" in found[name], name


@pytest.mark.parametrize("name", LOSS_CLASSES)
def test_loss_class_entry(site, name):
    entry = entries(site)[name]
    assert "Bases:" not in entry and "_LossModule" not in entry
    assert "Returns" not in sections(entry)


def test_one_h1_and_a_complete_toc(site):
    for path, content in pages(site).items():
        main = content[content.index('<article class="md-content__inner') :]
        assert len(re.findall(r"<h1[ >]", main)) == 1, path
        toc = content[content.index("md-nav--secondary") :]
        for anchor in re.findall(r'<h2 id="([^"]+)"', main):
            assert f'href="#{anchor}"' in toc, (path, anchor)


def test_console_examples_copy_without_prompts(site):
    css = (site / "css" / "code.css").read_text()
    assert "code[data-md-copying] .gp" in css and "code[data-md-copying] .go" in css
    blocks = 0
    for path, content in pages(site).items():
        # Every >>> in a code block is a console prompt (.gp), not an operator.
        assert content.count("&gt;&gt;&gt;") == content.count(
            '<span class="gp">&gt;&gt;&gt; </span>'
        ), path
        blocks += content.count('<span class="gp">&gt;&gt;&gt; </span>')
        # An output line's newline is inside its span (hidden with it).
        outputs = re.findall(r'<span class="go">[^<]*</span>', content)
        assert all(o.endswith("\n</span>") for o in outputs), (path, outputs[:3])
    assert blocks > 100


_COPY_PROBE = """<script>
window.__copied = [];
document.execCommand = function () {
  window.__copied.push(document.activeElement.value);
  return true;
};
setTimeout(function () {
  const buttons = document.querySelectorAll('button[data-md-type="copy"]');
  buttons.forEach(function (b) { b.click(); });
  setTimeout(function () {
    const out = document.createElement("pre");
    out.id = "copy-probe";
    out.textContent = JSON.stringify(window.__copied);
    document.body.appendChild(out);
  }, 500);
}, 1500);
</script></body>"""


def test_copy_button_in_a_browser(site):
    """Clicks every copy button of a guide in Chromium and reads what it copied."""
    browser = next(
        (shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
         if shutil.which(b)),
        None,
    )  # fmt: skip
    if browser is None:
        pytest.skip("no Chromium to click the copy button in (the HTML is checked)")
    page = site / "numerics" / "index.html"
    probe = page.with_name("copy-probe.html")
    probe.write_text(page.read_text().replace("</body>", _COPY_PROBE))
    profile = site.parent / "chromium-profile"
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}",
         "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    copied = json.loads(
        html.unescape(re.search(r'<pre id="copy-probe">(.*?)</pre>', dom, re.S)[1])
    )
    assert len(copied) >= 5
    for snippet in copied:
        assert ">>>" not in snippet and "Array(" not in snippet, snippet
        compile(snippet, "<copied>", "exec")  # what is copied is Python
    assert "jxent.cross_entropy(masked, jnp.array([0]))\n" in "\n".join(copied)
