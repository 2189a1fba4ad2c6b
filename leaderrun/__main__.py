"""``python -m leaderrun``: the same as the ``leaderrun`` command."""

from leaderrun.console import main

main()
