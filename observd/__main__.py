"""`python -m observd` is the same as the `observd` command."""

from observd.cli import main

raise SystemExit(main())
