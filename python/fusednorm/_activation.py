"""The fused activation's name <-> the integer code the ops take (csrc/common/norm_math.h)."""

_CODES = {None: 0, "relu": 1, "leaky_relu": 2}


def activation_code(activation):
    """0, 1 or 2 for None, "relu", "leaky_relu"; ValueError naming anything else."""
    try:
        return _CODES[activation]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown activation {activation!r}: expected None, 'relu' or 'leaky_relu'"
        ) from None


def activation_repr(activation, negative_slope):
    """The extra_repr suffix for a module's activation ("" when there is none)."""
    if activation is None:
        return ""
    if activation == "leaky_relu":
        return f", activation={activation}, negative_slope={negative_slope}"
    return f", activation={activation}"
