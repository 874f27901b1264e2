"""The upstream GenHead parameter list, ``tests/data/genhead_state_dict.txt``, parsed for
the tests that hold head4d's modules to upstream's names, shapes and parameter counts.

Not a test file (no ``test_`` prefix).
"""
import re
from pathlib import Path
from typing import Dict, List, Tuple

DATA = Path(__file__).parent / "data" / "genhead_state_dict.txt"

Entry = Tuple[str, Tuple[int, ...], str]


def upstream_sections(strip_prefix: bool = False) -> Dict[str, Tuple[int, int, List[Entry]]]:
    """``{section: (key count, parameter count, [(name, shape, dtype), ...])}`` in file
    order, one section per ``== name: K keys, P params`` header (``backbone``,
    ``background``, ``superresolution``). ``strip_prefix`` drops each name's first
    component (``backbone.synthesis.b4.const`` -> ``synthesis.b4.const``)."""
    sections, current = {}, None
    for line in DATA.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        header = re.match(r"== (\w+): (\d+) keys, (\d+) params", line)
        if header:
            current = header.group(1)
            sections[current] = (int(header.group(2)), int(header.group(3)), [])
            continue
        name, shape, dtype = re.match(r"(\S+) (\(.*\)) (\w+)$", line).groups()
        dims = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        sections[current][2].append((name.split(".", 1)[1] if strip_prefix else name, dims, dtype))
    return sections
