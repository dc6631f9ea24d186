"""The model contract (models/base.py) across every family x conditioning.

First of all the golden test: the refactor behind the contract must leave every family bit-for-bit as it was
on main (names, shapes and order of the state_dict, the initial values and so the global RNG's draws, the
forward pass); tests/model_golden.py holds the fingerprints taken before it."""

import pytest

from tests.model_golden import CASES, GOLDEN, fingerprint


@pytest.mark.parametrize("case", list(CASES))
def test_every_family_is_bit_for_bit_the_model_of_main(case):
    now, then = fingerprint(case), GOLDEN[case]
    assert [s.split()[0] for s in now["state"]] == [s.split()[0] for s in then["state"]], "names or their order"
    changed = [a for a, b in zip(now["state"], then["state"], strict=True) if a != b]
    assert not changed, f"shapes or initial values differ (now): {changed}"
    assert now["buffers"] == then["buffers"]
    assert now["rng_after_build"] == then["rng_after_build"], "the build drew a different amount from the global RNG"
    assert now["outputs"] == then["outputs"], "the forward pass changed"
