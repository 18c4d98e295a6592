"""minipt.kernels: the fused prompt-concat op (Triton kernels, autograd, reference, dispatcher)."""
from .prompt_concat import prompt_concat, prompt_concat_reference

__all__ = ["prompt_concat", "prompt_concat_reference"]
