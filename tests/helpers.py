"""Helpers more than one test module needs."""
import torch


def randomise_zero_inits(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Fresh UNets output exactly zero (zero-initialised last layers); random weights make the checks non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.abs().max() == 0:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
