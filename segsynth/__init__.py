"""segsynth: the world through the eyes of a neural net (DeepLab -> remap -> SPADE), streamed."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("segsynth")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
