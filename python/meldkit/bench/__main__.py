"""``python -m meldkit.bench``: see :mod:`meldkit.bench`."""

from meldkit.bench import main

raise SystemExit(main())
