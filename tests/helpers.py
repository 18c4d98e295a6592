"""Small shared helpers for the tests (imported as `helpers`: pytest puts tests/ on sys.path)."""
import torch

from minipt import GPT, GPTConfig


def random_gpt(config: dict, seed: int = 0, std: float | None = None) -> GPT:
    """A small GPT with seeded weights; with `std`, every weight matrix is redrawn from N(0, std).

    GPT-2's init (std 0.02) makes all logits nearly equal, so greedy decoding is trivially constant and a
    prompt has almost no effect; a larger std makes the outputs depend on the input.
    """
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**config))
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, std)
    return model
