"""The int / float argument checks the quantizers share (fastvq.checks): what passes, what raises,
and that every message names the argument and the value received."""

import pytest

from fastvq.checks import int_at_least, is_int, nonnegative_int, positive_float, positive_int


def test_is_int_rejects_bools_and_floats():
    assert is_int(0) and is_int(-3) and is_int(2**70)
    assert not is_int(True) and not is_int(False) and not is_int(1.0) and not is_int("1") and not is_int(None)


@pytest.mark.parametrize("good", [1, 7, 2**40])
def test_positive_int_passes_values_through(good):
    assert positive_int(good, "heads") is good


@pytest.mark.parametrize("bad", [0, -1, True, 1.0, "2", None])
def test_positive_int_raises(bad):
    with pytest.raises(ValueError, match=rf"^heads must be a positive int, got {bad!r}$"):
        positive_int(bad, "heads")


def test_nonnegative_int():
    assert nonnegative_int(0, "iters") == 0 and nonnegative_int(5, "iters") == 5
    for bad in (-1, False, 0.0):
        with pytest.raises(ValueError, match=rf"^iters must be an int >= 0, got {bad!r}$"):
            nonnegative_int(bad, "iters")


def test_int_at_least():
    assert int_at_least(3, "k", 3) == 3
    with pytest.raises(ValueError, match=r"^k must be an int >= 3, got 2$"):
        int_at_least(2, "k", 3)


def test_positive_float():
    assert positive_float(2, "scale") == 2.0 and isinstance(positive_float(2, "scale"), float)
    assert positive_float(0.5, "scale") == 0.5
    for bad in (0.0, -1.0, float("inf"), float("nan"), True, "1"):
        with pytest.raises(ValueError, match=r"^scale must be a finite float > 0, got "):
            positive_float(bad, "scale")
