from csmn.synth.archive import main

raise SystemExit(main())
