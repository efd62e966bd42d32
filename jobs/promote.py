from csmn.pipeline.promote import main

raise SystemExit(main())
