from csmn.extract import main

raise SystemExit(main())
