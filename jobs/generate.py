from csmn.pipeline.generate import main

raise SystemExit(main())
