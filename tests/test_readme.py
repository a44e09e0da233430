"""The README's commands and code run as written, and its code checks its results.

Every Python block in the README (and, through ``check_snippet``, in
``docs/*.md``) must check what it computes: with an ``assert`` (or a
``np.testing``/``chex`` assertion), or with ``print(...)`` calls that each carry
the expected output as a trailing comment, ``print(x)  # 24.535688, the norm``.
What a commented print prints is compared with the comment's leading values:
numbers within a relative 1e-5, other words exactly; the rest of the comment
is prose. A block that does neither fails.
"""

import ast
import builtins
import io
import math
import pathlib
import re
import sys
import tokenize

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# The comparison tests need the `compare` extra; the README's second command
# sets this variable so that they fail, not skip, when a library is missing.
REQUIRE_COMPARE = "CLIPJAX_REQUIRE_COMPARE=1"
COMPARE_TESTS = ("tests/test_torch_parity.py", "tests/test_per_example_benchmark.py")

# A number (a sign, digits, a fraction, an exponent; inf, nan) or a word: a run
# of characters other than blanks and the brackets, commas, colons and quotes
# of printed containers.
_TOKEN = re.compile(
  r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?!\w|\.\d)|[-+]?\b(?:inf|nan)\b"
  r"|[^\s\[\](){},:'\"]+"
)
RTOL = 1e-5


def _value(token: str) -> float | None:
  try:
    return float(token)
  except ValueError:
    return None


def _same(printed: str, expected: str) -> bool:
  a, b = _value(printed), _value(expected)
  if a is None or b is None:
    return printed == expected
  if math.isnan(a) or math.isnan(b):
    return math.isnan(a) and math.isnan(b)
  return math.isclose(a, b, rel_tol=RTOL, abs_tol=1e-12)


def _mismatch(printed: str, comment: str) -> str | None:
  """Why ``printed`` does not match the leading values of ``comment`` (or None)."""
  got, want = _TOKEN.findall(printed), _TOKEN.findall(comment)
  if not got:
    return "it printed nothing"
  if len(want) < len(got):
    return f"the comment {comment!r} holds fewer values than were printed"
  for g, w in zip(got, want, strict=False):
    if not _same(g, w):
      return f"printed {g!r} where the comment says {w!r}"
  if len(want) > len(got) and _value(want[len(got)]) is not None:
    return f"the comment {comment!r} expects more values than were printed"
  return None


def _comments(code: str) -> dict[int, str]:
  """Line number -> the text of the comment on that line."""
  tokens = tokenize.generate_tokens(io.StringIO(code).readline)
  return {
    t.start[0]: t.string.lstrip("#").strip()
    for t in tokens
    if t.type == tokenize.COMMENT
  }


def _name(func: ast.expr) -> str:
  if isinstance(func, ast.Attribute):
    return func.attr
  return func.id if isinstance(func, ast.Name) else ""


def check_snippet(code: str, where: str) -> None:
  """Runs ``code`` and checks that it checks its result (see the module docstring).

  Raises:
    AssertionError: the block checks nothing, a print has no expected value, a
      commented print printed something else or never ran, or the block's own
      assertion failed.
  """
  tree = ast.parse(code)
  comments = _comments(code)
  asserts = [
    n
    for n in ast.walk(tree)
    if isinstance(n, ast.Assert)
    or (isinstance(n, ast.Call) and _name(n.func).startswith("assert"))
  ]
  prints = {}  # (first line, last line) -> the expected output
  for node in ast.walk(tree):
    if isinstance(node, ast.Call) and _name(node.func) == "print":
      lines = range(node.lineno, node.end_lineno + 1)
      found = [comments[i] for i in lines if i in comments]
      assert found, (
        f"{where}, line {node.lineno}: print(...) without the expected output"
        " as a trailing comment (print(x)  # 1.5, what it is)"
      )
      prints[node.lineno, node.end_lineno] = found[-1]
  assert asserts or prints, (
    f"{where} checks nothing: add an assert, or print with the expected value"
    " as a trailing comment"
  )

  printed: list[tuple[int, str]] = []

  def recording_print(*args, sep=None, end=None, file=None, flush=False):
    if file is not None:
      builtins.print(*args, sep=sep, end=end, file=file, flush=flush)
      return
    text = (" " if sep is None else sep).join(map(str, args))
    printed.append((sys._getframe(1).f_lineno, text))

  # optax's own code mixes dtypes, so snippets run with standard promotion
  # (the suite's conftest makes it strict).
  with jax.numpy_dtype_promotion("standard"):
    exec(compile(code, where, "exec"), {"print": recording_print})

  ran = set()
  for line, text in printed:
    (span,) = [s for s in prints if s[0] <= line <= s[1]]
    ran.add(span)
    why = _mismatch(text, prints[span])
    assert why is None, f"{where}, line {span[0]}: {why} (it printed {text!r})"
  never = sorted(s[0] for s in set(prints) - ran)
  assert not never, f"{where}: the prints on lines {never} never ran"


def _blocks(lang):
  return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_opens_with_the_commands_and_ci_runs_both_in_order():
  bash = _blocks("bash")
  assert "clipjax demo" in bash[0]
  test_command, compare_command = bash[1].strip(), bash[2].strip()
  assert "pytest" in test_command
  assert README.index(bash[2]) < README.index("## Quickstart")
  # The second command installs the compare extra and runs the comparison
  # tests with the variable that turns their skips into failures.
  assert "compare]" in compare_command
  assert f"{REQUIRE_COMPARE} " in compare_command
  for path in COMPARE_TESTS:
    assert (ROOT / path).is_file(), path
    assert path in compare_command.split(), path
  ci = (ROOT / ".ci" / "run").read_text()
  commands = [line.strip() for line in ci.splitlines() if line.strip()]
  commands = [c for c in commands if not c.startswith(("#", "set ", "cd "))]
  assert commands == [test_command, compare_command]


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_readme_python_blocks_check_their_results(index):
  check_snippet(_blocks("python")[index], f"README block {index}")


def test_readme_table_lists_every_public_name():
  import clipjax

  section = README.split("## Public names")[1].split("\n## ")[0]
  first_cells = re.findall(r"^\| (`.*?) \|", section, flags=re.M)
  table = {name for cell in first_cells for name in re.findall(r"`(\w+)", cell)}
  assert table == set(clipjax.__all__)


# The checker itself: blocks that check wrongly or not at all must fail.

PASSES = {
  "a number": "x = 1 / 3\nprint(x)  # 0.333333, a third",
  "within the tolerance": "print(24.5356883)  # 24.535688",
  "an array and words": (
    "import numpy as np\nprint(np.array([0.6, 0.8]), 'ok')  # [0.6 0.8] ok, scaled"
  ),
  "a multi-line print": "print(\n  2.0,\n  3.0,\n)  # 2.0 3.0",
  "a loop": "for v in (1.0, 1.0):\n  print(v)  # 1.0 each time",
  "a print in a function": "def f():\n  print(-0.5)  # -0.5\nf()",
  "nan and inf": "print(float('nan'), float('-inf'))  # nan -inf",
  "an assert": "assert 1 + 1 == 2",
  "np.testing": "import numpy as np\nnp.testing.assert_allclose(0.1 + 0.2, 0.3)",
  "prose after a value": "print(5.0)  # 5.0 = 3 + 2",
  "a full stop after a value": "print(5.0)  # 5.0.",
}
FAILS = {
  "a wrong value": ("print(0.040756956)  # 0.04075", "printed '0.040756956'"),
  "beyond the tolerance": ("print(1.0001)  # 1.0", "printed '1.0001'"),
  "a wrong word": ("print(True)  # False", "printed 'True'"),
  "prose where the value goes": ("print(2.0)  # the norm", "printed '2.0'"),
  "a missing value": ("print(1.0)  # 1.0 2.0", "expects more values"),
  "too many values": ("print(1.0, 2.0)  # 1.0", "fewer values"),
  "no comment": ("x = 2\nprint(x)\nassert x == 2", "without the expected output"),
  "nothing checked": ("x = 2 * 3", "checks nothing"),
  "a print that never runs": (
    "if False:\n  print(1.0)  # 1.0",
    "never ran",
  ),
  "a failing assert": ("assert 1 + 1 == 3, 'arithmetic'", "arithmetic"),
  "an empty print": ("print()  # 1.0", "printed nothing"),
}


@pytest.mark.parametrize("name", PASSES)
def test_checker_accepts_a_block_that_checks_rightly(name):
  check_snippet(PASSES[name], name)


@pytest.mark.parametrize("name", FAILS)
def test_checker_rejects_a_block_that_checks_wrongly_or_not_at_all(name):
  code, message = FAILS[name]
  with pytest.raises(AssertionError, match=re.escape(message)):
    check_snippet(code, name)
