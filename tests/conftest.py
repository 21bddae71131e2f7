from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

# Bytecode is written, whatever PYTHONDONTWRITEBYTECODE says (the machines' environment sets it,
# CI's too): every cachegate process a test starts (supervisors, their workers, CLI calls: well
# over a thousand in a run) imports the package, and each one compiled its 1.5 MB of source again,
# about 0.2 s of CPU, a third of a worker's start (the suite is bound by the CPU of its 2 cores).
# Compiled once into the checkout's __pycache__ folders (ignored by git; Python checks each against
# its source's size and time), the 30 heaviest test files took 28 % less CPU. Set before the
# imports below, so that this process already writes the modules the harness imports, and
# inherited by every process started from here on (xdist's workers included).
if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None:
    sys.dont_write_bytecode = False

from hypothesis import settings as hypothesis_settings

from tests.harness import Clock, Origin, Proxy, start_proxy
from tests.ports import Ports
from tests.storage.procs import kill_leftovers

# Hypothesis's deadline (200 ms an example) is a wall-clock assertion: on 2 shared cores a policy
# property test's example took 305 ms once and failed a full run. Tests assert behaviour, never
# speed: no deadline.
hypothesis_settings.register_profile("cachegate", deadline=None)
hypothesis_settings.load_profile("cachegate")

MakeProxy = Callable[..., Awaitable[Proxy]]

# The processes tests start (``cachegate run``, its workers) import this checkout's ``proxy``,
# whatever checkout the venv's editable install points at and whatever their working folder:
# a relative PYTHONPATH (``PYTHONPATH=.``) named the test's temporary folder for them.
_ROOT = str(Path(__file__).resolve().parent.parent)
os.environ["PYTHONPATH"] = os.pathsep.join(
    dict.fromkeys([_ROOT, *(os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)]))


@pytest.fixture
def ports() -> Iterator[Ports]:
    """Ports held for this test, let go at its end (tests/ports.py): ``ports.hold()`` is a
    port nothing listens on that no other test's server is given meanwhile, where a server that
    this test starts later can still listen."""
    with Ports() as held:
        yield held


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    o = Origin()
    await o.start()
    yield o
    await o.stop()


@pytest.fixture
async def make_proxy(tmp_path: Path, origin: Origin) -> AsyncIterator[MakeProxy]:
    """Start cachegate in front of ``origin``: ``await make_proxy(config="...", rules="...")``."""
    proxies: list[Proxy] = []

    async def make(config: str = "", rules: str | None = None, directory: Path | None = None,
                   upstreams: list[str] | None = None) -> Proxy:
        d = directory or tmp_path
        d.mkdir(parents=True, exist_ok=True)
        p = await start_proxy(str(d), origin.url, config, rules, upstreams)
        proxies.append(p)
        return p

    yield make
    for p in proxies:
        await p.session.close()
        await p.close()


@pytest.fixture
async def proxy(make_proxy: MakeProxy) -> Proxy:
    return await make_proxy()


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def clocked(make_proxy: MakeProxy, clock: Clock, config: str = "", rules: str | None = None) -> Proxy:
    """A proxy whose engine runs on ``clock`` (``Clock.run_on``)."""
    proxy = await make_proxy(config=config, rules=rules)
    clock.run_on(proxy.runtime)
    return proxy


@pytest.fixture(autouse=True)
def _signals_as_they_were() -> Iterator[None]:
    """A test that calls ``main(["run", ...])`` in this process leaves SIGINT, SIGTERM and
    SIGHUP ignored (``cmd_run`` ignores them as the process exits): every later test in
    the same pytest worker then ran with Ctrl-C ignored, and a child it started inherited that
    (the warm command's Ctrl-C test failed so in a full run). Their handlers are put back."""
    held = [(sig, signal.getsignal(sig)) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)]
    yield
    for sig, handler in held:
        if signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)


@pytest.fixture(autouse=True)
def _no_cachegate_left_running() -> Iterator[None]:
    """A test that fails before it stops its ``cachegate run`` does not leave it (and its
    workers) running for the rest of the session."""
    yield
    kill_leftovers()
