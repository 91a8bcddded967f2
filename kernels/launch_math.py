"""Integer arithmetic of the kernel launchers (grids, tile widths), on plain Python ints.

`triton.cdiv` and `triton.next_power_of_2` are `ConstexprFunction`s in Triton 3.6 and 3.8, whose
wrapper unwraps constexpr arguments on every call: ~1.5 us on the host against ~0.02 us for the
same arithmetic here (this project's 2-core VM), and a launcher makes several per launch."""
from __future__ import annotations


def cdiv(numerator: int, denominator: int) -> int:
    """ceil(numerator / denominator) for ints, denominator > 0 (as `triton.cdiv`)."""
    return -(-numerator // denominator)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, for n >= 1 (as `triton.next_power_of_2`)."""
    return 1 << (n - 1).bit_length()
