from csmn.pipeline.preprocess import main

raise SystemExit(main())
