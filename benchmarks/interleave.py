"""Long-lived measurement workers for interleaved A/B runs: each variant in a process of its own (its environment,
its memory, its first step), driven one repetition at a time by the parent, so that every variant meets the same
load. The parent writes a command line to a worker's stdin; the worker answers one `MARK`ed JSON line on stdout
(anything else it prints there, oneDNN's verbose log say, is skipped)."""

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time

from benchmarks import harness

MARK = "@@lever "


class Worker:
    """`python script *arguments` in its own process group, stderr to a temporary file."""

    def __init__(self, script, arguments, env=None):
        self.stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by `close`)
        command = [sys.executable, os.path.abspath(script), *arguments]
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            bufsize=1,
            start_new_session=True,
            env=env,
        )

    def ask(self, command, timeout):
        """Send `command` (None: only read) and return the worker's answer, or `{"error": ...}` with the end of
        its stderr when it dies, fails or runs past `timeout` seconds (then it is killed)."""
        self.skipped = []  # the other lines it printed meanwhile
        if command is not None:
            try:
                self.process.stdin.write(command + "\n")
                self.process.stdin.flush()
            except (BrokenPipeError, OSError):
                return self._failure("the worker is gone")
        deadline = time.monotonic() + timeout
        stream = self.process.stdout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([stream], [], [], left)[0]:
                self.kill()
                return self._failure(f"timed out after {timeout:.0f} s")
            line = stream.readline()
            if not line:
                self.process.wait()
                return self._failure(f"the worker exited with status {self.process.returncode}")
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
            self.skipped.append(line)

    def _failure(self, reason):
        self.stderr.seek(0)
        lines = [line for line in self.stderr.read().splitlines() if line.strip()]
        return {"error": reason, "stderr_tail": lines[-harness.STDERR_TAIL_LINES :]}

    def kill(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def close(self, timeout=30):
        """Ask the worker to quit; its last answer (its peak memory)."""
        last = self.ask("quit", timeout) if self.process.poll() is None else {}
        self.kill()
        self.stderr.close()
        return last


def answer(result):
    """In a worker: send `result` to the parent, after what C libraries (oneDNN) buffered on stdout."""
    import ctypes

    sys.stdout.flush()
    ctypes.CDLL(None).fflush(None)
    print(MARK + json.dumps(result), flush=True)


def serve(setup, repetition):
    """In a worker: `setup()`'s result as the first answer, then `repetition()`'s for every "run" line until "quit"
    or the end of stdin; an exception becomes `{"error": ...}` (traceback on stderr) and ends the worker."""
    try:
        answer(setup())
        for line in sys.stdin:
            if line.strip() == "quit":
                break
            answer(repetition())
        answer({"peak_rss_mb": harness.peak_rss_mb()})
    except Exception as e:
        import traceback

        traceback.print_exc()
        answer({"error": f"{type(e).__name__}: {harness.error_cause(e)}"})
        return 1
    return 0


def timed_steps(step, steps):
    """Seconds of each of `steps` calls of `step` (which waits for its result), and the process's CPU seconds over
    them all (user + system: how much of the cores it got)."""
    begin = os.times()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    end = os.times()
    return {"step_s": seconds, "cpu_s": end.user + end.system - begin.user - begin.system}
