"""``python -m proxy`` and the ``cachegate`` console script ([project.scripts]): one entry.

Light on purpose: only ``sys`` and ``proxy.earlysignals`` (``signal``) are imported before
``hold()``, so that a SIGHUP or SIGTERM in a ``run``'s first moments (the imports of
``proxy.cli`` take a tenth of a second or more) is remembered, not fatal. ``proxy/__init__.py``
imports nothing.
"""

import sys


def main() -> int:
    if sys.argv[1:2] == ["run"]:
        # Before the imports: from here on a SIGHUP or SIGTERM is remembered, not fatal.
        from proxy.earlysignals import hold

        hold()

    from proxy.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
