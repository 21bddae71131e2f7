import sys

if sys.argv[1:2] == ["run"]:
    # Before the imports: from here on a SIGHUP or SIGTERM is remembered, not fatal.
    from proxy.earlysignals import hold

    hold()

from proxy.cli import main

raise SystemExit(main())
