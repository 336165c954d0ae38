"""Subcommands of ``asymvlm`` that need the transformers path. Each module defines
``add_parser(commands)`` and imports heavy packages only inside its ``run`` function."""
