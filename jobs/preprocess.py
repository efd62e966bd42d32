from csmn.preprocess import main

raise SystemExit(main())
