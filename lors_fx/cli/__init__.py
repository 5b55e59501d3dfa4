"""The ``lors-fx`` command line: :func:`main` dispatches to one module per subcommand."""
from lors_fx.cli.main import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]
