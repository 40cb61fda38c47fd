"""segsynth: the world through the eyes of a neural net (DeepLab -> remap -> SPADE), streamed."""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("segsynth")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# In a checkout, the subpackages segsynth.export/engine/stream/benchmarks live beside this
# folder (pyproject's package-dir mapping), and `python` started in the checkout's root imports
# this folder instead of the installed package. Searching the checkout root as well makes them
# importable there too; an installed package holds them inside and never takes this branch.
_checkout = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "stream").is_dir() and (_checkout / "stream" / "__init__.py").is_file():
    __path__.append(str(_checkout))
