"""Continuous batching's generation loop in a process of its own, beside Triton's Python stub.

In one process the generation loop and the dispatcher that answers requests (text assembly, one
Triton response per streamed piece) share one interpreter lock, and so one core: the served engine
ran at 0.93 of a core while the machine had more (docs/benchmarks.md). Here the child process loads
the weights and runs `ManagerBatcher`; the stub keeps the tokenizer (`Prompter`), the queue and the
responses, and the two exchange requests and new tokens over a socket pair. vLLM splits its server
the same way, for the same reason.

The child lives as long as its connection: it exits when the stub closes it or dies. If the child
dies first (killed, crashed, or its generation loop failed), `steps` raises GenerationStoppedError with why.

`python -m deeptune_serving.batcher_process FD` is the child; FD is its end of the socket pair.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection

from deeptune_serving.batcher import GenerationStoppedError, ManagerBatcher, TokenStep
from deeptune_serving.generation import Generator, LoadSettings, Prompt

STOP_SECONDS = 30.0
"""How long the child may take to stop its generation loop before it is killed."""
FORWARD_POLL_SECONDS = 0.2


class BatcherProcess:
    """A `Batcher` whose model and generation loop run in a child process (see the module's doc)."""

    def __init__(self, settings: LoadSettings, capacity: int, max_new_tokens_limit: int) -> None:
        """Start the child and wait until it has loaded the model; RuntimeError with the child's reason
        when it could not."""
        self.capacity = capacity
        ours, theirs = socket.socketpair()
        self._process = subprocess.Popen(
            [_python(), "-m", __name__, str(theirs.fileno())], pass_fds=(theirs.fileno(),)
        )
        theirs.close()
        self._connection = Connection(ours.detach())
        self._sending = threading.Lock()
        """add (Triton's request threads) and cancel (the dispatcher) send from different threads."""
        self._send(("load", settings, capacity, max_new_tokens_limit))
        try:
            reply = self._connection.recv()
        except EOFError:
            reply = ("failed", f"{self._ended()} while loading the model")
        if reply[0] != "ready":
            self.close()
            raise RuntimeError(reply[1])

    def add(self, request_id: str, prompt: Prompt) -> None:
        self._send(("add", request_id, prompt))

    def cancel(self, request_id: str) -> None:
        self._send(("cancel", request_id))

    def _send(self, message: tuple[object, ...]) -> None:
        # OSError: the child is gone, and the dispatcher's next `steps` says why.
        with self._sending, contextlib.suppress(OSError):
            self._connection.send(message)

    def steps(self, timeout: float) -> list[TokenStep]:
        found: list[TokenStep] = []
        try:
            ready = self._connection.poll(timeout)
            while ready:
                message = self._connection.recv()
                if message[0] == "stopped":
                    raise GenerationStoppedError(message[1])
                found.extend(message[1])
                ready = self._connection.poll(0)
        except (EOFError, OSError) as error:
            raise GenerationStoppedError(self._ended()) from error
        return found

    def _ended(self) -> str:
        """How the child ended, in words (it has, or is about to: its connection closed)."""
        try:
            code = self._process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            return "the generation process closed its connection"
        if code < 0:
            return f"the generation process was killed by {signal.Signals(-code).name}"
        return f"the generation process exited with code {code}"

    def close(self) -> None:
        self._send(("close",))
        try:
            self._process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._connection.close()


def _python() -> str:
    """This interpreter's executable, for the child (Triton's stub sets sys.executable to the python3 on
    its PATH, the one whose site-packages it reads)."""
    found = sys.executable or shutil.which("python3")
    if not found:
        raise RuntimeError("no python3 executable to run the generation process with")
    return found


def _forward(batcher: ManagerBatcher, connection: Connection) -> None:
    """Send the parent every batch of new tokens; once generation has stopped, why. (The only thread
    of the child that sends, once it runs.)"""
    while True:
        try:
            steps = batcher.steps(FORWARD_POLL_SECONDS)
        except GenerationStoppedError as stopped:
            message: tuple[object, ...] = ("stopped", str(stopped))
        else:
            if not steps:
                continue
            message = ("steps", steps)
        try:
            connection.send(message)
        except OSError:  # the parent is gone; the main thread ends this process
            return
        if message[0] == "stopped":
            return


def _serve(connection: Connection) -> None:
    """The child: load, report, then generate until the parent says close or goes away."""
    _, settings, capacity, limit = connection.recv()
    try:
        batcher = ManagerBatcher(Generator.load(settings, max_new_tokens_limit=limit), capacity)
    except Exception as error:  # every load failure goes to the parent, which reports it
        connection.send(("failed", f"{type(error).__name__}: {error}"))
        return
    connection.send(("ready",))
    threading.Thread(target=_forward, args=(batcher, connection), daemon=True).start()
    try:
        while (message := connection.recv())[0] != "close":
            if message[0] == "add":
                batcher.add(message[1], message[2])
            else:
                batcher.cancel(message[1])
    except EOFError:  # the parent died without closing
        pass
    batcher.close()


def main() -> None:
    connection = Connection(int(sys.argv[1]))
    _serve(connection)
    connection.close()
    os._exit(0)  # not waiting on the manager's threads: the loop has stopped, or is lost with the parent


if __name__ == "__main__":
    main()
