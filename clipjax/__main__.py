"""``python -m clipjax``: the same as the ``clipjax`` command."""

import sys

from clipjax.cli import main

if __name__ == "__main__":
  sys.exit(main())
