"""Single-bit flips across a small vault: every load is right or raises a VaultError.

A sample of bits (every 1009th) keeps this quick; issue #4's sweep covers every bit.
"""

from __future__ import annotations

import numpy as np

import modelvault


def test_flipped_bits_never_give_a_wrong_model_or_a_foreign_exception(tmp_path):
    base = tmp_path / "base.vault"
    weights = np.arange(2000, dtype=np.float32)
    with modelvault.open(base) as vault:
        vault.save("a", {"w": weights, "t": (1, "x")}, metadata={"m": 1}, tags={"k": "v"},
                   aliases=["p"])
        vault.save("b", {"s": {1, 2}})
    data = base.read_bytes()
    target = tmp_path / "flipped.vault"
    outcomes = {"right": 0, "refused": 0}
    for bit in range(0, len(data) * 8, 1009):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        target.write_bytes(flipped)
        try:
            with modelvault.open(target) as vault:
                a, b = vault.load("a"), vault.load("b")
                vault.verify()
        except modelvault.VaultError:
            outcomes["refused"] += 1
            continue
        assert np.array_equal(a["w"], weights) and a["t"] == (1, "x"), f"bit {bit}"
        assert b == {"s": {1, 2}}, f"bit {bit}"
        outcomes["right"] += 1
    assert outcomes["right"] + outcomes["refused"] == len(range(0, len(data) * 8, 1009))
    assert outcomes["refused"] > 0  # the sample does hit bytes that matter
