"""timm's BiT under `torch.compile` (default mode): timm eager's model and steps, run through the compiled network.
The compilation happens in the first step."""


def compiled(model):
    import torch

    return torch.compile(model)
