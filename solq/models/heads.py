"""Small building blocks shared by the transformer and the detector heads (as in the authors' release)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "inverse_sigmoid", "class_prior_bias", "refine_boxes", "upcast"]


class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last): in -> hidden x (n-1) -> out.

    Layers are ``layers.{0..n-1}`` as in the release. forward: [..., in] -> [..., out].
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def upcast(t: torch.Tensor) -> torch.Tensor:
    """Lift half/bfloat16 to float32; keep float32/float64 as they are (float64 for tests)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """logit(x) with x clamped to [0,1] and both x and 1-x clamped below at ``eps`` (release semantics)."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def class_prior_bias(prior: float = 0.01) -> float:
    """Bias making sigmoid(logit) == prior at init: -log((1 - p) / p) (about -4.595 for 0.01)."""
    return -math.log((1 - prior) / prior)


def refine_boxes(delta: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Box from a head output and a reference: sigmoid(delta + logit(ref)).

    delta: [..., 4] unnormalised; reference: [..., 4] box (logit added to all four entries) or [..., 2]
    point (added to the centre only). Returns [..., 4] in (0, 1), in float32 when the inputs are
    half/bfloat16 (boxes and the decoder's references keep full precision under autocast).
    """
    delta, reference = upcast(delta), upcast(reference)
    ref = inverse_sigmoid(reference)
    if reference.shape[-1] == 4:
        out = delta + ref
    elif reference.shape[-1] == 2:
        out = torch.cat([delta[..., :2] + ref, delta[..., 2:]], dim=-1)
    else:
        raise ValueError(f"reference must end in 2 or 4, got shape {tuple(reference.shape)}")
    return out.sigmoid()
