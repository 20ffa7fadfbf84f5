"""Models shared by tests, benchmarks and the demo, built from configs with random weights."""

from .dit import DiT, DiTConfig
from .gpt import GPT, GPTConfig
from .small import MLP, ConvNet, TwoBranch

__all__ = ["GPT", "GPTConfig", "DiT", "DiTConfig", "MLP", "ConvNet", "TwoBranch"]
