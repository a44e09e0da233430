"""A mkdocs hook: the pages' TeX rendered as MathML when the site is built.

pymdownx.arithmatex (generic mode) leaves each formula as TeX for a script to
typeset in the browser: ``<span class="arithmatex">\\(...\\)</span>`` inline,
``<div class="arithmatex">\\[...\\]</div>`` displayed. This hook converts each
one to MathML with latex2mathml, which browsers render natively, so the site
needs no script and no network, to build or to read. A formula latex2mathml
cannot convert fails the build, naming the page and the formula.
"""

import html
import re
from typing import Any

from latex2mathml.converter import convert
from mkdocs.exceptions import PluginError

FORMULA = re.compile(r'<(span|div) class="arithmatex">(.*?)</\1>', re.DOTALL)
DELIMITERS = {"span": ("\\(", "\\)"), "div": ("\\[", "\\]")}


def on_page_content(html_text: str, page: Any, **_: Any) -> str:
  def render(m: re.Match) -> str:
    tag, body = m.groups()
    tex = html.unescape(body).strip()
    opening, closing = DELIMITERS[tag]
    if not (tex.startswith(opening) and tex.endswith(closing)):
      raise PluginError(f"{page.file.src_path}: unexpected arithmatex {tex!r}")
    tex = tex[len(opening) : -len(closing)]
    try:
      mathml = convert(tex, display="block" if tag == "div" else "inline")
    except Exception as e:  # latex2mathml raises several exception types
      raise PluginError(
        f"{page.file.src_path}: latex2mathml cannot convert {tex!r}: {e!r}"
      ) from e
    return f'<{tag} class="arithmatex">{mathml}</{tag}>'

  return FORMULA.sub(render, html_text)
