from k2store.cli import main

raise SystemExit(main())
