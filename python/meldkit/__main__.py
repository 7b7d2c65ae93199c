from meldkit.cli import main

raise SystemExit(main())
