"""A griffe extension: the reStructuredText bits of clipjax's docstrings as Markdown.

The docstrings are Google style, read by mkdocstrings as Markdown, but they
cross-reference with Sphinx roles (``:func:`compress```) and cite papers with
reST links. This rewrites, in every docstring of the package:

- ``:func:`name``` (and ``:class:``, ``:meth:``, ``:attr:``, ``:mod:``,
  ``:data:``, ``:obj:``; ``~`` keeps only the last part) into an autorefs
  cross-reference to the object's canonical path, resolved from the
  docstring's own scope as Python would. A name that does not resolve is
  left as a reference, so that ``mkdocs build --strict`` fails on it;
- ```title <url>`_`` into ``[title](url)``;
- ``:math:`x``` into ``\\(x\\)``, which arithmatex hands to MathJax;
- a paragraph ending in ``::`` into one ending in ``:`` (the indented block
  after it is a code block in Markdown too), and ``\\ `` into nothing.
"""

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|obj):`(~?)([\w.]+)`")
LINK = re.compile(r"`([^`<]+?)\s*<(https?://[^>]+)>`__?", re.DOTALL)
MATH = re.compile(r":math:`([^`]+)`")
LITERAL = re.compile(r"(\S)::$", re.MULTILINE)


class RstToMarkdown(griffe.Extension):
  """Rewrites the package's docstrings once it is loaded."""

  def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **_: Any):
    for obj in _walk(pkg):
      if obj.docstring is not None:
        obj.docstring.value = _rewrite(obj, obj.docstring.value, loader)


def _walk(obj: griffe.Object):
  """Every object defined in ``obj``, aliases (re-exports) left out."""
  yield obj
  for member in obj.members.values():
    if not member.is_alias:
      yield from _walk(member)


def _target(scope: griffe.Object, name: str, loader: griffe.GriffeLoader) -> str:
  """The canonical path of ``name`` seen from ``scope``; ``name`` if unknown."""
  head, _, rest = name.partition(".")
  try:
    path = scope.resolve(head) + ("." + rest if rest else "")
  except griffe.NameResolutionError:
    path = name
  try:
    found = loader.modules_collection[path]
  except (KeyError, griffe.AliasResolutionError):
    return path
  try:
    found = found.final_target if found.is_alias else found
  except griffe.AliasResolutionError:
    return path
  # A dataclass field described in its class's Attributes section has no
  # heading of its own: point at the class.
  if found.is_attribute and found.docstring is None and found.parent.is_class:
    found = found.parent
  return found.path


def _rewrite(obj: griffe.Object, text: str, loader: griffe.GriffeLoader) -> str:
  scope = obj if obj.is_module or obj.is_class else obj.parent or obj

  def role(m: re.Match) -> str:
    tilde, name = m.groups()
    title = name.rsplit(".", 1)[-1] if tilde else name
    return f"[`{title}`][{_target(scope, name, loader)}]"

  text = ROLE.sub(role, text)
  text = MATH.sub(r"\\(\1\\)", text)
  text = LINK.sub(lambda m: f"[{' '.join(m[1].split())}]({m[2]})", text)
  text = LITERAL.sub(r"\1:", text)
  return text.replace("\\ ", "")
