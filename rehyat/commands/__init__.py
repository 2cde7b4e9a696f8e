"""One module per CLI command (``add_parser(subparsers)``, ``run(args)``); see :mod:`rehyat.cli`."""
