from csmn.pipeline.train import main

raise SystemExit(main())
