from flushgate.cli import main

raise SystemExit(main())
