from csmn.experiments.ablation import main

raise SystemExit(main())
