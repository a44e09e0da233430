"""The README's commands and code run as written."""

import pathlib
import re

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang):
  return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
  bash = _blocks("bash")
  assert "clipjax demo" in bash[0]
  assert "pytest" in bash[1]
  assert README.index(bash[1]) < README.index("## Quickstart")
  ci = (ROOT / ".ci" / "run").read_text()
  assert bash[1].strip() in ci


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_readme_python_blocks_run(index):
  # optax's own code mixes dtypes, so README code runs with standard promotion.
  with jax.numpy_dtype_promotion("standard"):
    exec(compile(_blocks("python")[index], f"README block {index}", "exec"), {})


def test_readme_table_lists_every_public_name():
  import clipjax

  section = README.split("## Public names")[1].split("\n## ")[0]
  first_cells = re.findall(r"^\| (`.*?) \|", section, flags=re.M)
  table = {name for cell in first_cells for name in re.findall(r"`(\w+)", cell)}
  assert table == set(clipjax.__all__)
