"""BiT architectures by name ("R50x1": ResNet-v2 depth 50, width 1): units per block, channels, parameter counts."""

import re

BLOCK_UNITS = {14: (1, 1, 1, 1), 26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
ARCHITECTURES = ("R14x0.5", "R26x0.5", "R26x1", "R50x1", "R50x3", "R101x1", "R101x3", "R152x2", "R152x4")
ARCH_PATTERN = re.compile(r"R(\d+)x(\d+(?:\.\d+)?)")


def parse_architecture(arch: str) -> tuple[tuple[int, ...], int | float]:
    """`"R50x1"` -> `((3, 4, 6, 3), 1)`; widths may be fractional (`"R26x0.5"`). A ValueError for anything else
    (`bit_keras.models.zoo.parse_architecture` adds the closest zoo names)."""
    match = ARCH_PATTERN.fullmatch(str(arch))
    if not match or int(match.group(1)) not in BLOCK_UNITS:
        depths = "|".join(map(str, BLOCK_UNITS))
        raise ValueError(f"unknown architecture {arch!r}: expected R{{{depths}}}x<width>")
    width = float(match.group(2))
    return BLOCK_UNITS[int(match.group(1))], int(width) if width.is_integer() else width


def architecture_name(block_units, width) -> str:
    """`((3, 4, 6, 3), 1)` -> `"R50x1"`; a ValueError for units of no BiT depth."""
    depth = next((depth for depth, units in BLOCK_UNITS.items() if units == tuple(block_units)), None)
    if depth is None:
        raise ValueError(f"units per block {tuple(block_units)} match no BiT depth {sorted(BLOCK_UNITS)}")
    return f"R{depth}x{width:g}"


def channels(width, base=64):
    """`base * width` as an int, refusing widths that do not give whole channel counts."""
    value = base * width
    if value != int(value) or value < 1:
        raise ValueError(f"width={width} gives {value} channels from {base}: choose a width with whole channels")
    return int(value)


def parameter_count(arch: str, num_classes: int = 0) -> int:
    """Parameters of an architecture with GN + WS, computed from its layer shapes without building it."""
    block_units, width = parse_architecture(arch)
    root = channels(width)
    total, cin = 7 * 7 * 3 * root, root
    for b, units in enumerate(block_units, start=1):
        mid = root * 2 ** (b - 1)
        for u in range(units):
            total += 2 * cin + cin * mid + 2 * mid + 9 * mid * mid + 2 * mid + mid * 4 * mid
            total += cin * 4 * mid if u == 0 else 0  # projection on unit01
            cin = 4 * mid
    return total + 2 * cin + (cin * num_classes + num_classes)
