from csmn.synth import main

raise SystemExit(main())
