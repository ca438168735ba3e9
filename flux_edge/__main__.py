from flux_edge.cli import main

raise SystemExit(main())
