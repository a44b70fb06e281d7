"""MkDocs hooks: the pages' generated parts, rendered from the code at build time so that they cannot drift.

A page asks for one with an HTML comment on a line of its own:

- `<!-- generated: cli -->`: every `bit-keras` subcommand's `--help`, from `bit_keras.cli.build_parser()`;
- `<!-- generated: zoo -->`: the zoo table, from `bit_keras.models.zoo.CHECKPOINTS`;
- `<!-- generated: architectures -->`: the bare architectures and their parameter counts;
- `<!-- generated: presets -->`: every preset's name and keras-hub alias;
- `<!-- include: PATH -->`: a file of the repository (the measured results live in `benchmarks/RESULTS.md`).
"""

import argparse
import os
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^<!-- (generated|include): (\S+) -->$", re.MULTILINE)


def _cli() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps help at the terminal's width: the page's is fixed
    from bit_keras.cli import build_parser

    parser = build_parser()
    parser.prog = "bit-keras"
    parts = ["## bit-keras", "", "```text", parser.format_help().rstrip(), "```"]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                parts += ["", f"## bit-keras {name}", "", "```text", sub.format_help().rstrip(), "```"]
    return "\n".join(parts)


def _zoo() -> str:
    from bit_keras.models import zoo

    rows = [
        "| name | architecture | upstream data | classes | input | params (M) | labels |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in zoo.CHECKPOINTS.values():
        params = zoo.parameter_count(e.arch, e.num_classes) / 1e6
        rows.append(
            f"| `{e.name}` | {e.arch} | {e.upstream} | {e.num_classes} | {e.input_size} | {params:.1f} | {e.labels} |"
        )
    return "\n".join(rows)


def _architectures() -> str:
    from bit_keras.models import architecture

    rows = ["| architecture | units per block | width | params (M), without head |", "|---|---|---|---|"]
    for arch in architecture.ARCHITECTURES:
        units, width = architecture.parse_architecture(arch)
        rows.append(f"| {arch} | {units} | {width} | {architecture.parameter_count(arch) / 1e6:.1f} |")
    return "\n".join(rows)


def _presets() -> str:
    from bit_keras.models import presets

    rows = ["| preset | keras-hub alias | classes | input |", "|---|---|---|---|"]
    for p in presets.PRESETS.values():
        rows.append(f"| `{p.name}` | `{p.alias}` | {p.num_classes} | {p.input_size} |")
    return "\n".join(rows)


GENERATORS = {"cli": _cli, "zoo": _zoo, "architectures": _architectures, "presets": _presets}


# Links between the repository's Markdown files, as the site has them (an included file's links are the repository's).
SITE_PAGES = {
    "README.md": "index.md",
    "CONTRIBUTING.md": "contributing.md",
    "benchmarks/RESULTS.md": "experiments.md",
    "exports/README.md": "guides/export.md#the-export-folder",
}
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def _site_links(text: str, page_path: str) -> str:
    """An included file's relative links, mapped to the site's pages and made relative to the page including it."""
    depth = page_path.count("/")

    def fix(match):
        target, anchor = match.group(1), match.group(2) or ""
        if "://" in target:
            return match.group(0)
        site = SITE_PAGES.get(target) or (target[len("docs/") :] if target.startswith("docs/") else None)
        if site is None:
            return match.group(0)
        if "#" in site and anchor:
            site = site.split("#")[0]
        return f"]({'../' * depth}{site}{anchor})"

    return LINK.sub(fix, text)


def on_page_markdown(markdown, page, config, files):
    def replace(match):
        kind, what = match.groups()
        if kind == "include":
            text = (ROOT / what).read_text(encoding="utf-8")
            if re.search(r"^# ", markdown, re.MULTILINE):  # the page has its own title
                text = re.sub(r"\A# .*\n", "", text)
            return _site_links(text, page.file.src_uri)
        return GENERATORS[what]()

    return MARKER.sub(replace, markdown)
