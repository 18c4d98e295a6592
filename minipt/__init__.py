"""minipt: soft prompt tuning (Lester et al. 2021) for GPT-style models, small enough to read.

from minipt import GPT, GPTConfig, ByteTokenizer, PromptTuning, PromptBank, PrefixTuning
from minipt.kernels import prompt_concat
"""

from .model import GPT, GPTConfig
from .prefix import PrefixTuning
from .prompt import PromptTuning
from .serve import PromptBank
from .tokenizer import ByteTokenizer
from .train import TrainConfig

__version__ = "0.1.0"
__all__ = [
    "GPT",
    "GPTConfig",
    "ByteTokenizer",
    "PromptTuning",
    "PromptBank",
    "PrefixTuning",
    "TrainConfig",
    "__version__",
]
