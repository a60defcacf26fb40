"""`python -m deeptune_serving [options] -- tritonserver ...`: Triton and its OpenAI-compatible API.

The serving container's entrypoint. It starts the Triton command line given after `--` (the operator
writes it) and serves the OpenAI frontend beside it until either ends. Triton's exit ends the
container with Triton's exit code, so the pod's status says what Triton said (a model that failed to
load leaves its reason in the termination message); SIGTERM is passed on to Triton, which drains.
A process of the container killed at its memory limit ends the container too, with exit code 137
and the reason in the termination message (`memory.py` says why Triton alone would not end).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from deeptune_serving.memory import CGROUP, REPORT, oom_kills
from deeptune_serving.openai_api import FrontendSettings, create_app

PR_SET_PDEATHSIG = 1
"""prctl(2): the signal a process gets when its parent dies."""
STOP_GRACE_SECONDS = 25.0
"""How long Triton may take to finish in-flight requests after SIGTERM (the pod's grace is 30 s)."""
OOM_POLL_SECONDS = 1.0
OOM_EXIT_CODE = 137
"""128 + SIGKILL, what a container killed at its memory limit exits with."""


def _arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" not in argv:
        raise SystemExit("usage: python -m deeptune_serving [options] -- tritonserver [triton options]")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m deeptune_serving", description=__doc__)
    parser.add_argument("--model", required=True, help="the model's name in Triton and on the OpenAI API")
    parser.add_argument("--openai-port", type=int, default=9000)
    parser.add_argument("--openai-address", default="0.0.0.0")
    parser.add_argument("--triton-http", default="http://127.0.0.1:8000", help="Triton's HTTP endpoint")
    parser.add_argument("--cgroup", type=Path, default=CGROUP, help="the container's cgroup mount")
    parser.add_argument("--termination-log", type=Path, default=Path("/dev/termination-log"))
    return parser.parse_args(argv[:split]), argv[split + 1 :]


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handling, which re-raises SIGTERM once the server has
    stopped (killing this process before Triton has drained): `_serve` handles the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _die_with_parent() -> None:
    """In Triton's process, before it starts: be killed when the frontend dies, however it dies (a
    container ends both anyway; a bare process, as in the tests, would leave Triton running)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


async def _oom_kill(cgroup: Path, before: int | None) -> None:
    """Return once the kernel has killed a process of this container at its memory limit since the
    count was `before` (never, where the container's cgroup has no counter)."""
    if before is None:
        await asyncio.Event().wait()
    while oom_kills(cgroup) == before:
        await asyncio.sleep(OOM_POLL_SECONDS)


def _report_oom(termination_log: Path) -> None:
    print(f"error: {REPORT}", file=sys.stderr, flush=True)
    with contextlib.suppress(OSError):  # no such file outside a container
        termination_log.write_text(REPORT)


async def _serve(options: argparse.Namespace, triton_command: list[str]) -> int:
    killed_before = oom_kills(options.cgroup)
    triton = subprocess.Popen(triton_command, preexec_fn=_die_with_parent)  # noqa: PLW1509
    settings = FrontendSettings(model=options.model, triton_url=options.triton_http)
    config = uvicorn.Config(
        create_app(settings),
        host=options.openai_address,
        port=options.openai_port,
        log_level="warning",
        timeout_graceful_shutdown=int(STOP_GRACE_SECONDS),
    )
    server = _Server(config)
    for stop in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(stop, setattr, server, "should_exit", True)
    frontend = asyncio.create_task(server.serve())
    triton_done = asyncio.create_task(asyncio.to_thread(triton.wait))
    oom = asyncio.create_task(_oom_kill(options.cgroup, killed_before))
    await asyncio.wait({frontend, triton_done, oom}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    oom.cancel()
    if killed_before is not None and oom_kills(options.cgroup) != killed_before:  # Triton's or a child's
        _report_oom(options.termination_log)
        triton.kill()
        await triton_done
        await frontend
        return OOM_EXIT_CODE
    if triton.poll() is None:  # the frontend stopped (SIGTERM): let Triton drain, then stop
        triton.send_signal(signal.SIGTERM)
        # asyncio.wait, not wait_for: the image's Python 3.10 raises asyncio.TimeoutError, which is
        # not yet the builtin TimeoutError.
        drained, _ = await asyncio.wait({triton_done}, timeout=STOP_GRACE_SECONDS)
        if not drained:
            triton.kill()
    code = await triton_done
    await frontend
    return code if code >= 0 else 128 - code


def main() -> None:
    options, triton_command = _arguments(sys.argv[1:])
    sys.exit(asyncio.run(_serve(options, triton_command)))


if __name__ == "__main__":
    main()
