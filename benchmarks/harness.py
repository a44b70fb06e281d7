"""What every benchmark front-end shares: number flags, the fresh-process worker protocol with its timeout, timed
steps, peak memory, the machine and package versions, and JSON writing.

A front-end measures each thing in a fresh process of itself (hidden `--worker` flags), so that its memory peak and
first step are its own: `measure_in_fresh_process` in the parent, `run_worker` in the child.
"""

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
STDERR_TAIL_LINES = 15

# ----------------------------------------------------------------------------- command line


class OneLineErrors(argparse.ArgumentParser):
    """An argument error is one line on stderr (no usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def int_range(low, high):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}, got {text!r}")
        return value

    return parse


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def add_repetition_flags(parser, repeats_help, warmup_help, threads_help):
    """`--repeats`, `--warmup` and `--threads`, as the TensorFlow front-ends take them."""
    parser.add_argument("--repeats", type=positive_int, default=5, help=repeats_help)
    parser.add_argument("--warmup", type=positive_int, default=2, help=warmup_help)
    parser.add_argument("--threads", type=positive_int, default=2, help=threads_help)


# ----------------------------------------------------------------------------- the fresh-process protocol


def measure_in_fresh_process(script, arguments, timeout, timeout_flags, env=None):
    """Run `script *arguments --worker_out OUT` in a fresh process (its own process group, killed whole on a
    timeout or an interrupt); the JSON it wrote there, or `{"error": ...}`, with `worker_s` (its seconds) and, on
    failure, `stderr_tail`. `timeout_flags` names the flags that set `timeout` in the error."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "result.json")
        command = [sys.executable, os.path.abspath(script), *arguments, "--worker_out", out]
        begin = time.perf_counter()
        worker = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env
        )
        timed_out = False
        try:
            _, stderr = worker.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # timed out, or this process interrupted: the worker's own children too (torch.compile's)
            if worker.returncode is None:
                os.killpg(worker.pid, signal.SIGKILL)
        if timed_out:
            _, stderr = worker.communicate()
        worker_s = time.perf_counter() - begin
        lines = [line for line in stderr.splitlines() if line.strip()]
        if timed_out:
            result = {"error": f"timed out after {timeout:.0f} s ({timeout_flags})"}
        elif os.path.exists(out):
            with open(out, encoding="utf-8") as f:
                result = json.load(f)
        else:  # killed, for memory say
            result = {"error": lines[-1] if lines else f"the worker exited with status {worker.returncode}"}
    tail = {"stderr_tail": lines[-STDERR_TAIL_LINES:]} if "error" in result else {}
    return result | {"worker_s": worker_s} | tail


def run_worker(measure, out):
    """In the fresh process: write `measure()`'s result to `out` as JSON, or `{"error": ...}` with the traceback on
    stderr; the exit status."""
    try:
        result = measure()
    except Exception as e:
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {error_cause(e)}"}
    write_json(out, result)
    return 1 if "error" in result else 0


def error_cause(exception):
    """The last unindented line of the message: the cause, for TensorFlow's multi-line graph errors too."""
    lines = [line for line in str(exception).splitlines() if line.strip() and not line[0].isspace()]
    return lines[-1] if lines else repr(exception)


def write_json(path, data):
    """Replace `path` whole, so a run stopped at any time leaves a readable file."""
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(partial, path)


# ----------------------------------------------------------------------------- timed steps


@dataclasses.dataclass(frozen=True)
class Schedule:
    """`warmup` untimed calls of a step (the first one traces or compiles), then `repeats` timed repetitions of
    `steps` calls each."""

    warmup: int
    repeats: int
    steps: int = 1

    @property
    def calls(self):
        return self.warmup + self.repeats * self.steps

    def seconds(self, ends):
        """Each repetition's seconds, from the end times of all calls."""
        return [ends[i + self.steps] - ends[i] for i in range(self.warmup - 1, len(ends) - 1, self.steps)]


def step_ends(step, calls):
    """Call `step` (which waits for its result) `calls` times; the time at the end of each call."""
    ends = []
    for _ in range(calls):
        step()
        ends.append(time.perf_counter())
    return ends


def repetition_rates(start, ends, schedule, batch):
    """`first_step_s` (from `start` to the first end) and the images/s of each repetition: median, min, max."""
    rates = [batch * schedule.steps / seconds for seconds in schedule.seconds(ends)]
    return {
        "first_step_s": ends[0] - start,
        "images_per_s": statistics.median(rates),
        "images_per_s_min": min(rates),
        "images_per_s_max": max(rates),
        "images_per_s_reps": rates,
        "batch": batch,
    }


def timed_repetitions(step, schedule, batch):
    """`repetition_rates` of `step`, its first call timed from now."""
    start = time.perf_counter()
    return repetition_rates(start, step_ends(step, schedule.calls), schedule, batch)


def median_step(start, ends, schedule, batch):
    """`first_step_s` (from `start`: compilation included), and the images/s and ms of the median timed step."""
    seconds = schedule.seconds(ends)
    median = statistics.median(seconds)
    return {
        "first_step_s": ends[0] - start,
        "images_per_s": batch * schedule.steps / median,
        "ms_per_step": median * 1e3 / schedule.steps,
        "step_ms": [s * 1e3 / schedule.steps for s in seconds],
    }


def median_ms(step, repeats, warmup):
    """The median milliseconds of `repeats` calls of `step`, after `warmup` untimed ones."""
    ends = step_ends(step, warmup + repeats)
    return statistics.median(Schedule(warmup, repeats).seconds(ends)) * 1e3


def random_batch(batch, size, num_classes):
    """Fixed random float32 RGB images in [0, 1] (NHWC) and integer labels."""
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.random((batch, size, size, 3), dtype=np.float32), rng.integers(num_classes, size=batch)


# ----------------------------------------------------------------------------- memory, machine and versions


def peak_rss_mb():
    """This process's peak resident memory (VmHWM; ru_maxrss where /proc is missing), in MB."""
    for line in read_text("/proc/self/status").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_memory():
    """The peak memory of this process as its resident memory, in bytes."""
    return {"peak_memory_bytes": round(peak_rss_mb() * 2**20), "peak_memory_of": "process RSS"}


def machine_info():
    """CPU model and flags, CPU counts, memory and load, from /proc where there is one."""
    cpuinfo = read_text("/proc/cpuinfo")
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    meminfo = read_text("/proc/meminfo").split()
    return {
        "cpu": fields.get("model name", platform.processor() or "unknown"),
        "cpu_flags": [f for f in CPU_FLAGS if f in fields.get("flags", "").split()],
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_gb": round(int(meminfo[1]) / 2**20, 1) if meminfo[:1] == ["MemTotal:"] else None,
        "platform": platform.platform(),
        "load_average_start": os.getloadavg(),
    }


def cpu_name():
    return f"{machine_info()['cpu']} ({os.cpu_count()} logical CPUs)"


def read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


def package_versions(packages):
    """Python's version and each package's (None where it is not installed)."""
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found
