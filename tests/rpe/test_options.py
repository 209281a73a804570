"""Unknown RPE options: a ValueError naming the option, the RPE, its options and the closest
one, from ``build`` as from the config check (issue 14)."""

import inspect

import pytest

from geolinrpe.rpe import REGISTRY, build, names, option_names, unknown_option


@pytest.mark.parametrize("name", names())
def test_option_names_are_the_constructor_keywords(name):
    params = inspect.signature(REGISTRY[name].__init__).parameters
    expected = sorted(set(params) - {"self", "pos_dim", "num_heads"})
    assert option_names(name) == expected
    for key in expected:
        assert unknown_option(name, key) is None


def test_unknown_option_suggests_the_closest_and_lists_the_rest():
    with pytest.raises(ValueError) as info:
        build("flt-kernel", pos_dim=2, num_heads=2, lenghtscale=2.0)
    message = str(info.value)
    assert "bad option for rpe 'flt-kernel'" in message
    assert "ShiftInvariantKernelRPE (rpe 'flt-kernel') has no option 'lenghtscale'" in message
    assert "did you mean 'lengthscale'?" in message
    assert (
        "(its options: amplitude, frequencies, kernel, lengthscale, num_frequencies, "
        "orthogonal, quadrature_range)"
    ) in message
    problem = unknown_option("toeplitz-fft", "zzz")
    assert "did you mean" not in problem and "its options: max_offset" in problem
    with pytest.raises(ValueError, match="unknown rpe 'nope'"):
        option_names("nope")
