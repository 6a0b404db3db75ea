"""Single-bit flips across a small vault: every load is right or raises a VaultError.

A sample of bits keeps this quick: about 600 spread over the bytes that hold
something, and 150 in the zero bytes that fill most of the 64 KiB pages. Issue #4's
sweep covers every bit.
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
    array = np.frombuffer(data, np.uint8)
    used, empty = np.flatnonzero(array), np.flatnonzero(array == 0)
    rng = np.random.default_rng(0)
    bits = [int(i) * 8 + b for i in used[::max(1, len(used) // 75)] for b in range(8)]
    bits += [int(i) * 8 + int(rng.integers(8)) for i in rng.choice(empty, 150, replace=False)]
    for bit in bits:
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
    assert outcomes["right"] + outcomes["refused"] == len(bits) > 600
    assert outcomes["refused"] > 0  # the sample does hit bytes that matter
