from csmn.pipeline.extract import main

raise SystemExit(main())
