"""The documentation site: it builds clean, and it documents every public name.

The pages are ``docs/*.md``; each public name is rendered from its docstring by
a ``::: clipjax.name`` directive (mkdocstrings). The examples in those
docstrings run as doctests through pytest's ``--doctest-modules``; the checks
here make sure each public name has one, and that pytest collects it. The
Python blocks in the pages' prose run, and each checks its result by the
README's rule (``check_snippet`` in tests/test_readme.py). The built site
shows its math as MathML rendered at build time (docs/hooks/mathml.py) and
loads nothing from the network.
"""

import doctest
import importlib
import inspect
import re
import shutil
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from test_readme import check_snippet

import clipjax
import clipjax.compression
import clipjax.distributed
import clipjax.privacy

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PUBLIC_MODULES = (clipjax, clipjax.privacy, clipjax.distributed, clipjax.compression)
DIRECTIVE = re.compile(r"^::: (\S+)\s*$", re.MULTILINE)
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)|<img [^>]*src=\"([^\"]+)\"")
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
MAX_IMAGE_BYTES = 150_000
# In the built HTML: what a reader sees as text once code, scripts and MathML
# are cut out, and the TeX delimiters that must not survive in it.
NOT_PROSE = re.compile(r"<(pre|code|script|math)\b.*?</\1>", re.DOTALL)
RAW_TEX = re.compile(r"\\[()\[\]]|\$\$")
FORMULA = re.compile(r'<(span|div) class="arithmatex">(.*?)</\1>', re.DOTALL)
MATHML = re.compile(r"<math\b.*?</math>", re.DOTALL)
# In the Markdown sources: code (fenced or inline), then formula openings.
MD_CODE = re.compile(r"^```.*?^```|`[^`\n]+`", re.MULTILINE | re.DOTALL)
MD_FORMULA = re.compile(r"\\[(\[]|\$\$")
EXTERNAL_ASSET = re.compile(r"<(?:script|link|img)\b[^>]*(?:src|href)=\"(?:https?:)?//")


def public_names() -> dict[str, Any]:
  """``{"clipjax.privacy.dp_sgd": dp_sgd, ...}`` over the four ``__all__``."""
  return {
    f"{mod.__name__}.{name}": getattr(mod, name)
    for mod in PUBLIC_MODULES
    for name in mod.__all__
  }


def directives() -> list[tuple[str, str]]:
  """``(page, dotted path)`` of every ``:::`` directive in the docs."""
  return [
    (page.name, m[1])
    for page in sorted(DOCS.glob("*.md"))
    for m in DIRECTIVE.finditer(page.read_text())
  ]


def lookup(path: str) -> Any:
  """The object a dotted path names, importing its module; raises if none."""
  parts = path.split(".")
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except ImportError:
      continue
    for attr in parts[i:]:
      obj = getattr(obj, attr)
    return obj
  raise ImportError(path)


def unique_public() -> dict[int, tuple[str, Any]]:
  """One ``(first public name, object)`` per public object (re-exports merged)."""
  found: dict[int, tuple[str, Any]] = {}
  for name, obj in public_names().items():
    found.setdefault(id(obj), (name, obj))
  return found


def python_blocks() -> list[tuple[str, str]]:
  """``(page and index, code)`` of every Python code block in the pages' prose."""
  return [
    (f"{page.name}[{i}]", code)
    for page in sorted(DOCS.glob("*.md"))
    for i, code in enumerate(PYTHON_BLOCK.findall(page.read_text()))
  ]


def is_documented_callable(obj: Any) -> bool:
  """Functions and classes need an example; modules and constants do not."""
  return inspect.isfunction(obj) or inspect.isclass(obj)


def built_page(site: Path, page: str) -> Path:
  """The HTML that ``docs/<page>`` builds to (mkdocs' directory URLs)."""
  stem = page.removesuffix(".md")
  return site / "index.html" if stem == "index" else site / stem / "index.html"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
  """The site built by ``mkdocs build --strict``, and the build's output."""
  site = tmp_path_factory.mktemp("docs") / "site"
  run = subprocess.run(
    [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  output = run.stdout + run.stderr
  assert run.returncode == 0, f"mkdocs build --strict failed:\n{output}"
  return site, output


def test_mkdocs_build_is_strict_and_clean(site: tuple[Path, str]):
  path, output = site
  assert "WARNING" not in output, output
  html = "".join(p.read_text() for p in path.rglob("*.html"))
  unrendered = [path for _, path in directives() if f'id="{path}"' not in html]
  assert not unrendered, f"directives that rendered no heading: {unrendered}"


def test_built_pages_show_no_raw_tex(site: tuple[Path, str]):
  raw = {}
  for page in sorted(site[0].rglob("*.html")):
    prose = NOT_PROSE.sub("", page.read_text())
    hits = [
      prose[max(0, m.start() - 40) : m.end() + 40] for m in RAW_TEX.finditer(prose)
    ]
    if hits:
      raw[str(page.relative_to(site[0]))] = hits[:3]
  assert not raw, f"TeX left for a script to typeset (docs/hooks/mathml.py): {raw}"


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_built_pages_render_their_math_as_mathml(site: tuple[Path, str], page: str):
  source = MD_CODE.sub("", (DOCS / page).read_text())
  html = built_page(site[0], page).read_text()
  formulas = FORMULA.findall(html)
  # Each formula of the page's prose is MathML; docstrings may add more.
  assert len(formulas) >= len(MD_FORMULA.findall(source)), page
  for _, body in formulas:
    assert MATHML.fullmatch(body), f"{page}: a formula not rendered: {body[:200]}"
    element = ET.fromstring(body)  # well-formed, as browsers' MathML needs
    assert element.find(".//{*}merror") is None, f"{page}: {body[:200]}"


def test_built_pages_load_nothing_from_the_network(site: tuple[Path, str]):
  remote = {
    str(page.relative_to(site[0])): EXTERNAL_ASSET.findall(page.read_text())
    for page in site[0].rglob("*.html")
  }
  remote = {page: tags for page, tags in remote.items() if tags}
  assert not remote, f"pages that load scripts, styles or images remotely: {remote}"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (Debian's package)")
def test_a_page_with_math_renders_in_headless_chromium(
  site: tuple[Path, str], tmp_path: Path
):
  assert CHROMIUM is not None
  shot = tmp_path / "clipping.png"
  run = subprocess.run(
    [
      CHROMIUM,
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--window-size=1200,1600",
      f"--screenshot={shot}",
      built_page(site[0], "clipping.md").as_uri(),
    ],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert run.returncode == 0, run.stderr[-2000:]
  assert shot.read_bytes().startswith(b"\x89PNG"), "no screenshot written"


def test_every_directive_names_a_public_object():
  bad, private, repeated = [], [], []
  public_ids = {id(obj) for obj in public_names().values()}
  seen: set[str] = set()
  for page, path in directives():
    if path in seen:
      repeated.append(f"{page}: {path}")
    seen.add(path)
    try:
      obj = lookup(path)
    except (ImportError, AttributeError):
      bad.append(f"{page}: {path}")
      continue
    if id(obj) not in public_ids:
      private.append(f"{page}: {path}")
  assert not bad, f"directives naming nothing: {bad}"
  assert not private, f"directives naming a non-public object: {private}"
  assert not repeated, f"directives repeated: {repeated}"


def test_every_public_name_is_on_exactly_one_page():
  documented: dict[int, list[str]] = {}
  for page, path in directives():
    try:
      documented.setdefault(id(lookup(path)), []).append(f"{page}: {path}")
    except (ImportError, AttributeError):
      continue  # reported by test_every_directive_names_a_public_object
  missing = [n for n, obj in public_names().items() if id(obj) not in documented]
  twice = {
    n: documented[id(obj)]
    for n, obj in public_names().items()
    if len(documented.get(id(obj), [])) > 1
  }
  assert not missing, f"public names on no docs page (add a ::: directive): {missing}"
  assert not twice, f"public names documented more than once: {twice}"


def test_modules_and_constants_are_described():
  pages = {p.name: p.read_text() for p in DOCS.glob("*.md")}
  prose = "\n".join(DIRECTIVE.sub("", text) for text in pages.values())
  undescribed = []
  for name, obj in unique_public().values():
    if isinstance(obj, ModuleType):
      if not (obj.__doc__ or "").strip():
        undescribed.append(f"{name} (no module docstring)")
    elif not is_documented_callable(obj) and name.rsplit(".", 1)[1] not in prose:
      undescribed.append(f"{name} (a constant never named in the pages' prose)")
  assert not undescribed, undescribed


def test_public_callables_have_a_runnable_example():
  lacking = []
  for name, obj in unique_public().values():
    if not is_documented_callable(obj):
      continue
    doc = inspect.getdoc(obj) or ""
    section = re.search(r"^Examples:\n((?:[ \t]+.*\n?|\n)+)", doc, re.MULTILINE)
    if section is None or ">>>" not in section[1]:
      lacking.append(name)
  assert not lacking, (
    "public names whose docstring has no 'Examples:' section with a '>>>'"
    f" doctest: {sorted(lacking)}"
  )


def test_examples_are_collected_by_pytest_doctest_modules():
  config = tomllib.loads((ROOT / "pyproject.toml").read_text())
  pytest_ini = config["tool"]["pytest"]["ini_options"]
  assert "--doctest-modules" in pytest_ini["addopts"].split()
  assert "clipjax" in pytest_ini["testpaths"]
  finder = doctest.DocTestFinder()
  uncollected = []
  for name, obj in unique_public().values():
    if not is_documented_callable(obj) or ">>>" not in (inspect.getdoc(obj) or ""):
      continue
    module = sys.modules[obj.__module__]
    source = Path(inspect.getfile(module)).resolve()
    tests = {t.name for t in finder.find(module) if t.examples}
    if (ROOT / "clipjax") not in source.parents or (
      f"{module.__name__}.{obj.__qualname__}" not in tests
    ):
      uncollected.append(f"{name} (defined in {module.__name__})")
  assert not uncollected, f"examples pytest would not run: {uncollected}"


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_images_exist_and_are_small(page: str):
  text = (DOCS / page).read_text()
  for m in IMAGE.finditer(text):
    src = m[1] or m[2]
    if src.startswith(("http://", "https://")):
      continue
    image = DOCS / src
    assert image.is_file(), f"{page} shows {src}, which does not exist"
    size = image.stat().st_size
    assert size < MAX_IMAGE_BYTES, f"{src} is {size:,} bytes (docs/make_plots.py)"


@pytest.mark.parametrize(
  ("where", "code"), [pytest.param(w, c, id=w) for w, c in python_blocks()]
)
def test_page_code_checks_its_results(where: str, code: str):
  # The README's rule (tests/test_readme.py): each block asserts, or prints
  # with the expected output as a trailing comment, and is run to check it.
  check_snippet(code, where)
