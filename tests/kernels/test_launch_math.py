"""The launchers' integer helpers give Triton's own results (`triton.cdiv`,
`triton.next_power_of_2`) on every value a launcher can pass them."""
import pytest

triton = pytest.importorskip("triton")

from headsteer.kernels.launch_math import cdiv, next_power_of_2


def test_cdiv_matches_triton():
    for numerator in [0, 1, 2, 3, 15, 16, 17, 63, 64, 65, 197, 12_608, 2**31 - 1, 2**31 + 5, 3 * 2**40 + 1]:
        for denominator in [1, 2, 3, 4, 7, 16, 32, 64, 128, 197]:
            assert cdiv(numerator, denominator) == triton.cdiv(numerator, denominator), (numerator, denominator)


def test_next_power_of_2_matches_triton():
    values = list(range(1, 4097)) + [2**k + delta for k in range(12, 40) for delta in (-1, 0, 1)]
    for n in values:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
