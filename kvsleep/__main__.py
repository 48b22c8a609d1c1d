from kvsleep.cli import main

raise SystemExit(main())
