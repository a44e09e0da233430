"""Regenerates the plots in docs/img/ by running the examples that draw them.

Each example writes its own PNG into a scratch folder; this script shrinks it
(about 80 dpi, 256 colours) so that the docs stay small, and writes it into
``docs/img/``. Run from anywhere, after ``pip install -e '.[examples]'``:

  python docs/make_plots.py            # the runs behind the README's numbers
  python docs/make_plots.py --quick --img /tmp/img   # a smoke run, elsewhere
  python docs/make_plots.py --only demo

``clipjax demo`` takes about a minute on 2 CPU cores, ``examples/spikes.py``
about 4 minutes (``--quick``: seconds).
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from matplotlib import colors, rcParams
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"
MAX_BYTES = 150_000
# The examples save at 110-120 dpi; 80 dpi keeps the text readable.
SCALE = {"demo": 80 / 110, "spikes": 80 / 120}


def commands(out: Path, quick: bool) -> dict[str, tuple[list[str], Path]]:
  """Per plot: the command that draws it, and the PNG it writes."""
  py = sys.executable
  demo = [py, "-m", "clipjax", "demo", "--out", str(out / "demo"), "--no-progress"]
  spikes = [py, str(ROOT / "examples" / "spikes.py"), "--out", str(out / "spikes")]
  if quick:
    demo += ["--steps", "100"]
    spikes += ["--quick"]
  return {
    "demo": (demo, out / "demo" / "clipjax-demo.png"),
    "spikes": (spikes, out / "spikes" / "loss.png"),
  }


def line_plot_palette() -> np.ndarray:
  """256 colours: matplotlib's line colours blended with white, and greys.

  An adaptive palette (PIL's median cut or octree) spends its colours on the
  greys of text and grid and merges the thin coloured lines into each other;
  the colours a line plot on white is drawn with are known in advance.
  """
  cycle = [colors.to_rgb(c) for c in rcParams["axes.prop_cycle"].by_key()["color"]]
  tints = np.linspace(1 / 22, 1, 22)[:, None]
  blends = [1 - tints * (1 - np.array(c)) for c in cycle[:10]]
  greys = np.repeat(np.linspace(0, 1, 256 - 22 * len(blends))[:, None], 3, axis=1)
  return np.round(255 * np.concatenate([*blends, greys])).astype(np.float32)


def shrink(src: Path, dst: Path, scale: float) -> int:
  """Writes ``src`` resized by ``scale`` as a palette PNG; returns its bytes."""
  with Image.open(src) as im:
    size = (round(im.width * scale), round(im.height * scale))
    small = np.asarray(im.convert("RGB").resize(size, Image.Resampling.LANCZOS))
  palette = line_plot_palette()
  found, where = np.unique(small.reshape(-1, 3), axis=0, return_inverse=True)
  found = found.astype(np.float32)
  distance = (found**2).sum(1)[:, None] - 2 * found @ palette.T + (palette**2).sum(1)
  index = distance.argmin(1).astype(np.uint8)[where.ravel()].reshape(small.shape[:2])
  image = Image.fromarray(index)  # "L"; putpalette makes it "P"
  image.putpalette(palette.astype(np.uint8).ravel().tolist())
  image.save(dst, optimize=True)
  return dst.stat().st_size


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="smaller, faster runs")
  parser.add_argument("--only", choices=sorted(SCALE), action="append")
  parser.add_argument("--img", type=Path, default=IMG, help="default docs/img")
  args = parser.parse_args(argv)
  args.img.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    for name, (cmd, png) in commands(Path(tmp), args.quick).items():
      if args.only and name not in args.only:
        continue
      print("$", " ".join(cmd), flush=True)
      subprocess.run(cmd, cwd=ROOT, check=True)
      dst = args.img / f"{name}.png"
      size = shrink(png, dst, SCALE[name])
      print(f"{dst}: {size:,} bytes", flush=True)
      if size > MAX_BYTES:
        sys.exit(f"{dst} is {size:,} bytes, over {MAX_BYTES:,}")


if __name__ == "__main__":
  main()
