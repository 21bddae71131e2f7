"""scripts/bench-calls' hook: cProfile in each cachegate serving worker, by signal.

Put on a cachegate process's PYTHONPATH with CACHEGATE_CALLS_DIR set (scripts/bench_calls.py
does both); nothing in cachegate itself knows about it. Only processes started as
``python -m proxy.supervisor worker`` profile. SIGUSR1 starts a fresh window, SIGUSR2 writes the
window to ``$CACHEGATE_CALLS_DIR/<pid>.prof`` (atomically) and starts the next one.
"""

import os

_DIR = os.environ.get("CACHEGATE_CALLS_DIR")


def _install(out_dir: str) -> None:
    import cProfile
    import signal

    state = [cProfile.Profile()]
    state[0].enable()

    def fresh(*_: object) -> None:
        state[0].disable()
        state[0] = cProfile.Profile()
        state[0].enable()

    def dump(*_: object) -> None:
        state[0].disable()
        path = os.path.join(out_dir, f"{os.getpid()}.prof")
        state[0].dump_stats(path + ".tmp")
        os.replace(path + ".tmp", path)
        fresh()

    signal.signal(signal.SIGUSR1, fresh)
    signal.signal(signal.SIGUSR2, dump)


if _DIR:
    with open("/proc/self/cmdline", "rb") as f:
        if b"proxy.supervisor\x00worker" in f.read():
            _install(_DIR)
