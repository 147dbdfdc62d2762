from shpc_lite.cli.main import main

raise SystemExit(main())
