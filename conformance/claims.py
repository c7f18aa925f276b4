"""The claim ids a check or a variant may name: SPEC.md's C01..C16, plus REF and EXT."""

from __future__ import annotations

import re

# REF: the plain path the claims are measured against; EXT: an optimized path the documentation
# set covers beyond SPEC's claims (torch.compile)
CLAIM_IDS = [f"C{n:02d}" for n in range(1, 17)] + ["REF", "EXT"]
CLAIM_RE = re.compile(r"^(C\d\d|REF|EXT)$")
