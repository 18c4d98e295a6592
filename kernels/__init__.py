"""minipt.kernels: the fused prompt-concat op (Triton kernels, autograd, reference, dispatcher)."""
import importlib
import sys

if __name__ == "kernels":
    # This folder was imported as a top-level package `kernels`: the repository root is on sys.path (e.g.
    # `python -m pytest` run from it) and a library probed for the unrelated `kernels` package on PyPI, as
    # transformers does. A second copy would register the minipt:: custom ops twice, so stand in for the one
    # true copy instead (the import system returns what sys.modules holds once this file has run).
    sys.modules["kernels"] = importlib.import_module("minipt.kernels")
else:
    from .prompt_concat import prompt_concat, prompt_concat_reference

    __all__ = ["prompt_concat", "prompt_concat_reference"]
