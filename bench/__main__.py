from flushgate.bench.runner import main

raise SystemExit(main())
