from csmn.evaluate import main

raise SystemExit(main())
