"""``python -m modelvault``: the same as the ``modelvault`` command."""

from ._cli import main

if __name__ == "__main__":
    main()
