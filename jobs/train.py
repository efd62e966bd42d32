from csmn.train import main

raise SystemExit(main())
