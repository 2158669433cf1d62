"""``python -m dmodel``: the ``dmodel`` command."""

from dmodel.cli import main

raise SystemExit(main())
