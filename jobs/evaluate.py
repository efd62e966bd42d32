from csmn.pipeline.evaluate import main

raise SystemExit(main())
