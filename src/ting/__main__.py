from ting.cli import main

raise SystemExit(main())
