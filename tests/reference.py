"""The torch.nn reference for the fused activations, shared by the test helpers and the fuzz
cases (which import nothing heavier)."""
import torch

# torch.nn's module for each activation name (the reference: norm, then this module).
REFERENCE_MODULES = {
    "relu": torch.nn.ReLU, "silu": torch.nn.SiLU, "gelu": torch.nn.GELU, "elu": torch.nn.ELU,
    "celu": torch.nn.CELU, "selu": torch.nn.SELU, "relu6": torch.nn.ReLU6, "hardtanh": torch.nn.Hardtanh,
    "hardswish": torch.nn.Hardswish, "hardsigmoid": torch.nn.Hardsigmoid, "sigmoid": torch.nn.Sigmoid,
    "tanh": torch.nn.Tanh, "softplus": torch.nn.Softplus, "mish": torch.nn.Mish,
}


def reference_activation(name, y):
    """torch.nn's activation `name` applied to y; float64 Hardsigmoid with an exact 1/6 (its
    float64 backward multiplies by 1/6 rounded to float32, ATen's hardsigmoid_backward: 3e-8
    relative; ours is exact, a documented difference)."""
    if name == "hardsigmoid" and y.dtype == torch.float64:
        return torch.nn.functional.relu6(y + 3) / 6
    return REFERENCE_MODULES[name]()(y)
