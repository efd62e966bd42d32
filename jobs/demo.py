from csmn.experiments.demo import job_main

raise SystemExit(job_main())
