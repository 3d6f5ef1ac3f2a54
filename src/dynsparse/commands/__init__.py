"""Subcommands of the ``dynsparse`` CLI, one module each, discovered by ``dynsparse.cli``."""
