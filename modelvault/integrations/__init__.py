"""Hooks into the tools people already train with. Each submodule imports its framework
when it is imported itself, so ``import modelvault`` imports none of them."""
