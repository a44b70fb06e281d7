"""The benchmarks' Markdown reports: the CPU benchmark's table of bit_keras beside its peer, and the GPU benchmark's
plan, progress lines, results, ratios to each peer, dtype audit and targets, each target stated as a requirement."""

from benchmarks import harness
from benchmarks.architecture import task_flops

BUSY_LOAD = 0.5  # a 1-minute load average from this on, before the run, gets a warning in the CPU report
BYTES_PER_GIB = 2**30
PEER_LABELS = {  # the GPU benchmark's peers
    "bit_keras": "bit_keras",
    "bit_keras_folded": "bit_keras, WS folded",
    "bit_keras_autodiff": "bit_keras, autodiff GN",
    "plain_keras": "plain Keras",
    "timm": "timm eager",
    "timm_compile": "timm + torch.compile",
}
RATIO_PEERS = ("timm_compile", "timm", "plain_keras")  # the GPU ratios' denominators, in the table's order
# GPU targets, bf16 at TARGET_RESOLUTION: (task, batch, images/s floor), each also TARGET_RATIO x timm + torch.compile.
TARGET_RESOLUTION = 224
SPEED_TARGETS = (("training", 64, 4800), ("inference", 128, 17000))
TARGET_RATIO = 1.3
TARGET_FIRST_STEP_S = 30
# The CPU table's rows: (label, task, key, format[, the peer's task]); the ratio: bit_keras's value / the peer's.
CPU_ROWS = (
    ("inference, images/s: median [min, max]", "inference", "images_per_s", "{:.1f}"),
    (
        "inference, weight standardization folded (`fold_weight_standardization()`), images/s",
        "folded",
        "images_per_s",
        "{:.1f}",
        "inference",
    ),
    ("training step, images/s: median [min, max]", "training", "images_per_s", "{:.1f}"),
    ("first training step, s (bit_keras: from the fit call)", "training", "first_step_s", "{:.1f}"),
    ("first inference call, s", "inference", "first_step_s", "{:.1f}"),
    ("peak memory, inference, MB", "inference", "peak_rss_mb", "{:.0f}"),
    ("peak memory, training, MB", "training", "peak_rss_mb", "{:.0f}"),
    ("parameters, M", "inference", "params", "{:.2f}"),
    (
        "training convolutions alone (forward + both backward passes, tf.nn.conv2d / torch conv2d), ms per step",
        "convolutions",
        "step_ms",
        "{:.0f}",
    ),
)


def table(columns, rows):
    """Markdown table lines."""
    line = lambda cells: "|" + "".join(f" {c} |" if c else " |" for c in cells)
    return [line(columns), "|" + "---|" * len(columns), *map(line, rows)]


def ratio(ours, theirs, key="images_per_s"):
    """ours[key] / theirs[key] to two decimals, or "-" where either is missing, failed or zero."""
    if not ours or not theirs or "error" in ours or "error" in theirs or not theirs.get(key):
        return "-"
    return f"{ours[key] / theirs[key]:.2f}"


def count(n, noun):
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("ch") else "s")


# ----------------------------------------------------------------------------- the CPU benchmark


def failures(results):
    """`"framework task failed: error"` for each failed measurement of the CPU benchmark."""
    frameworks = ("bit_keras", results["settings"]["peer"])
    return [
        f"{framework} {task} failed: {result['error']}"
        for framework in frameworks
        if framework
        for task, result in results[framework].items()
        if "error" in result
    ]


def cell(result, key, fmt):
    """One table cell: the value (with [min, max] for rates), or why there is none."""
    if result is None:
        return "-"
    if "error" in result:
        return "failed"
    value = result[key] / 1e6 if key == "params" else result[key]
    text = fmt.format(value)
    if key == "images_per_s":
        text += f" [{fmt.format(result['images_per_s_min'])}, {fmt.format(result['images_per_s_max'])}]"
    return text


def cpu_markdown(results, pipeline_sizes):
    """The CPU report: machine, versions, settings, then the measurements side by side."""
    s, m, v = results["settings"], results["machine"], results["versions"]
    peer = s["peer"]
    ours, theirs = results["bit_keras"], results.get(peer, {}) if peer else {}
    load = lambda values: "/".join(f"{x:.1f}" for x in values)
    lines = [
        f"## bit_keras benchmark: {s['arch']}, {s['dtype']}{', XLA' if s['xla'] else ''}",
        "",
        f"- machine: {m['cpu']}, {m['usable_cpus']} of {m['logical_cpus']} CPUs usable, {m['memory_gb']} GB; "
        f"flags: {' '.join(m['cpu_flags']) or 'none of ' + ', '.join(harness.CPU_FLAGS)}; "
        f"load average (1/5/15 min) {load(m['load_average_start'])} at start, {load(m['load_average_end'])} at end",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- inference: batch {s['batch']} at {s['resolution']}x{s['resolution']}; training step (forward, backward, "
        f"SGD momentum 0.9, softmax cross-entropy): batch {s['train_batch']} at "
        f"{s['train_resolution']}x{s['train_resolution']}; {s['num_classes']} classes",
        f"- {count(s['warmup'], 'warm-up batch')}, then {count(s['repeats'], 'repetition')} of "
        f"{count(s['steps'], 'batch')}, each measurement in a fresh process; {count(s['threads'], 'thread')}; "
        f"strategy {s['strategy']} over {count(s['cpu_devices'], 'CPU device')}",
        f"- peer: {_peer_line(peer, theirs) if peer else s['peer_note']}",
        "",
        *_load_warning(m),
    ]
    rows = []
    for label, task, key, fmt, *peer_task in CPU_ROWS:
        if task not in ours:
            continue
        mine, peers = ours[task], theirs.get(peer_task[0] if peer_task else task)
        rows.append([label, cell(mine, key, fmt), cell(peers, key, fmt) if peer else "-", ratio(mine, peers, key)])
    if "pipeline" in ours:
        rows.append(_pipeline_row(ours["pipeline"], ours.get("training"), pipeline_sizes))
    if "parity" in ours:
        p = ours["parity"]
        value = "failed" if "error" in p else f"{p['relative_max_diff']:.2e}"
        rows.append([f"{s['dtype']} vs float32 logits: max abs diff / max abs logit", value, "-", "-"])
    name = peer or "peer"
    lines += table(["", "bit_keras", name, f"bit_keras / {name}"], rows)
    failed = failures(results)
    return "\n".join(lines + ([""] + [f"- {line}" for line in failed] if failed else []))


def _load_warning(machine):
    load = machine["load_average_start"][0]
    if load < BUSY_LOAD:
        return []
    return [
        f"**Warning: the load average was {load:.1f} at the start: other processes compete for the CPUs, so the "
        "timings are noisy (torch's OpenMP threads can slow down 100x when a core they spin on is taken).**",
        "",
    ]


def _peer_line(peer, theirs):
    model = next((r["model"] for r in theirs.values() if "model" in r), "?")
    return f"{peer} {model} (random init, eager, NCHW; torch.autocast for mixed policies)"


def _pipeline_row(pipeline, training, sizes):
    label = "input pipeline alone (decode + augment, uncached), images/s"
    if "error" in pipeline:
        return [label, "failed", "-", "-"]
    (h_lo, h_hi), (w_lo, w_hi) = sizes
    label = (
        f"input pipeline alone ({pipeline['images']} JPEGs of {h_lo}-{h_hi}x{w_lo}-{w_hi}: decode, resize "
        f"{pipeline['resize']}, crop {pipeline['crop']}, flip; uncached), images/s"
    )
    text = cell(pipeline, "images_per_s", "{:.0f}")
    if training and "error" not in training:
        text += f"; {pipeline['images_per_s'] / training['images_per_s']:.1f}x the training step"
    return [label, text, "-", "-"]


# ----------------------------------------------------------------------------- the GPU benchmark


def gpu_header(report, measurements):
    """What is measured, on what, with which versions, and the planned measurements."""
    s, device = report["settings"], report["device"]
    flops = "; ".join(
        f"{r} px: {f / 1e9:.2f} GFLOP forward, {task_flops(f, 'training') / 1e9:.2f} training"
        for r, f in report["forward_flops_per_image"].items()
    )
    lines = [
        f"## GPU benchmark: {s['arch']} on {device['name']} ({device['kind']})",
        "",
        f"- command: `{report['command']}`",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v),
        f"- FLOPs per image (2 x multiply-adds of the convolutions and the head; training 3 x forward): {flops}",
        f"- median of {s['steps']} timed steps after {s['warmup']} warm-up step(s) (the first one compiles), each "
        f"measurement in a fresh process"
        + (f"; MFU against {s['peak_tflops']:g} TFLOP/s" if device["kind"] == "gpu" else ""),
    ]
    lines += [f"- {PEER_LABELS[peer]}: {why}" for peer, why in report["not_installed"].items()]
    lines += ["", f"Planned: {len(measurements)} measurements", ""]
    return "\n".join(lines + [f"{i}. {describe(m)}" for i, m in enumerate(measurements, start=1)] + [""])


def describe(m):
    return f"{PEER_LABELS[m['peer']]}, {m['dtype']}, {m['task']}, {m['resolution']} px, batch {m['batch']}"


def progress(result):
    """One measurement's result in a line."""
    if "error" in result:
        return f"failed after {result['worker_s']:.0f} s: {result['error']}"
    if "not_run" in result:
        return f"not run: {result['not_run']}"
    mfu = f", MFU {100 * result['mfu']:.1f}%" if "mfu" in result else ""
    return (
        f"{result['images_per_s']:,.0f} images/s, {result['ms_per_step']:.2f} ms/step, first step "
        f"{result['first_step_s']:.1f} s, peak {result['peak_memory_bytes'] / BYTES_PER_GIB:.2f} GiB{mfu} "
        f"(the worker took {result['worker_s']:.0f} s)"
    )


def results_table(results, device):
    columns = ["peer", "precision", "task", "resolution", "batch", "images/s", "ms/step", "first step s"]
    columns.append("peak memory GiB" if device == "gpu" else "peak memory GiB (process RSS)")
    columns += ["MFU %"] if device == "gpu" else []
    rows = []
    for r in results:
        cells = [PEER_LABELS[r["peer"]], r["dtype"], r["task"], str(r["resolution"]), str(r["batch"])]
        if "images_per_s" in r:
            cells += [f"{r['images_per_s']:,.0f}", f"{r['ms_per_step']:.2f}", f"{r['first_step_s']:.1f}"]
            cells += [f"{r['peak_memory_bytes'] / BYTES_PER_GIB:.2f}"]
            cells += [f"{100 * r['mfu']:.1f}"] if device == "gpu" else []
        else:
            cells += ["failed" if "error" in r else "not run"] + ["-"] * (len(columns) - len(cells) - 1)
        rows.append(cells)
    return table(columns, rows)


def find(results, peer, dtype, task, resolution, batch=None):
    """The measured result of that peer and setting, or None."""
    for r in results:
        same = (r["peer"], r["dtype"], r["task"], r["resolution"]) == (peer, dtype, task, resolution)
        if same and "images_per_s" in r and batch in (None, r["batch"]):
            return r
    return None


def ratios_table(results):
    """Each bit_keras variant's images/s over each peer's, setting by setting."""
    rows = []
    for dtype, task, resolution in dict.fromkeys((r["dtype"], r["task"], r["resolution"]) for r in results):
        theirs = [find(results, p, dtype, task, resolution) for p in RATIO_PEERS]
        for peer in ("bit_keras", "bit_keras_folded", "bit_keras_autodiff"):
            ours = find(results, peer, dtype, task, resolution)
            if ours:
                rows.append([dtype, task, str(resolution), PEER_LABELS[peer], *(ratio(ours, t) for t in theirs)])
    columns = ["precision", "task", "resolution", "bit_keras variant", *(f"/ {PEER_LABELS[p]}" for p in RATIO_PEERS)]
    return table(columns, rows)


def audit_table(audited):
    """The bf16 training steps' convolutions by operand type, and by result type once compiled."""
    rows = []
    for r in audited:
        counts = dict(r["convolution_dtypes"])
        total, bf16, f32 = sum(counts.values()), counts.pop("bf16", 0), counts.pop("f32", 0)
        other = ", ".join(f"{k}: {v}" for k, v in counts.items()) or "0"
        compiled = ", ".join(f"{k}: {v}" for k, v in sorted(r["compiled_convolution_dtypes"].items()))
        cells = [PEER_LABELS[r["peer"]], r["resolution"], total, bf16, f32, other, r["bf16_f32_converts"], compiled]
        rows.append([str(c) for c in cells])
    columns = ["peer", "resolution", "convolutions", "bf16", "f32", "other", "bf16/f32 converts"]
    return table([*columns, "compiled convolutions"], rows)


def gpu_summary(report):
    """The results table, failures and measurements not run, the ratios, the dtype audit and the targets."""
    results = report["results"]
    lines = ["", "### Results", "", *results_table(results, report["device"]["kind"])]
    notes = [f"- {describe(r)}: failed: {r['error']}" for r in results if "error" in r]
    notes += [f"- {describe(r)}: not run: {r['not_run']}" for r in results if "not_run" in r]
    lines += ["", *notes] if notes else []
    lines += ["", "### bit_keras / peers (images/s ratios)", "", *ratios_table(results)]
    audited = [r for r in results if r.get("convolution_dtypes") and r["dtype"] == "bf16"]
    if audited:
        lines += [
            "",
            "### bf16 training step: convolutions by operand type (StableHLO of the jitted step), and by result type "
            "once XLA compiled it",
            "",
            *audit_table(audited),
        ]
    for r in results:
        if "float32_precision_deviation" in r:
            lines += [
                "",
                f"fp32 logits at JAX's default matmul precision against `jax.default_matmul_precision('highest')` "
                f"({r['resolution']} px): {r['float32_precision_deviation']:.1e} of the largest logit "
                "(GPUs run float32 convolutions in TF32 by default; bit_keras's parity tests hold 1e-5).",
            ]
    return "\n".join(lines + ["", "### Targets", "", *target_lines(results)])


def target_lines(results):
    """Each target as a requirement, with what was measured and whether it is met."""
    lines = []
    for task, batch, floor in SPEED_TARGETS:
        requirement = (
            f"bf16 {task} at batch {batch}, {TARGET_RESOLUTION} px: at least {TARGET_RATIO}x timm + torch.compile "
            f"and at least {floor:,} images/s"
        )
        compiled = find(results, "timm_compile", "bf16", task, TARGET_RESOLUTION, batch)
        for peer in ("bit_keras", "bit_keras_folded") if task == "inference" else ("bit_keras",):
            ours = find(results, peer, "bf16", task, TARGET_RESOLUTION, batch)
            if ours is None:
                lines.append(f"- {requirement}: {PEER_LABELS[peer]} not measured")
                continue
            speed = ours["images_per_s"]
            if compiled is None:
                verdict = "timm + torch.compile not measured; " + ("floor met" if speed >= floor else "floor not met")
            else:
                times = speed / compiled["images_per_s"]
                met = times >= TARGET_RATIO and speed >= floor
                verdict = f"{times:.2f}x timm + torch.compile: {'met' if met else 'NOT met'}"
            lines.append(f"- {requirement}: {PEER_LABELS[peer]} {speed:,.0f} images/s, {verdict}")
    requirement = f"bit_keras's first training step: at most {TARGET_FIRST_STEP_S} s"
    first_steps = [r for r in results if r["peer"] == "bit_keras" and r["task"] == "training" and "first_step_s" in r]
    if not first_steps:
        lines.append(f"- {requirement}: not measured")
    for r in first_steps:
        met = "met" if r["first_step_s"] <= TARGET_FIRST_STEP_S else "NOT met"
        setting = f"{r['dtype']}, {r['resolution']} px, batch {r['batch']}"
        lines.append(f"- {requirement} ({setting}): {r['first_step_s']:.1f} s, {met}")
    return lines
