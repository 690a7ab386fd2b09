"""``make fuzz``: the targets of tests/fuzz/targets.py under atheris (libFuzzer, coverage-guided
over fleetune's code), each starting from its valid message. An input that raises anything but a
``PayloadError`` is a crash: libFuzzer stops and writes it to ``crash-*`` in the working folder.

    python -m tests.fuzz.run [--target NAME] [libFuzzer flags: -runs=N -max_total_time=S ...]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["fleetune"]):
    from tests.fuzz.targets import SEEDS, TARGETS, valid_or_payload_error


def main(argv: list[str]) -> None:
    names = sorted(TARGETS)
    if "--target" in argv:
        at = argv.index("--target")
        names = [argv[at + 1]]
        argv = argv[:at] + argv[at + 2 :]
    unknown = set(names) - set(TARGETS)
    if unknown:
        sys.exit(f"unknown target {sorted(unknown)}; targets: {sorted(TARGETS)}")

    def one_input(data: bytes) -> None:
        if not data:
            return
        valid_or_payload_error(names[data[0] % len(names)], data[1:])

    corpus = Path(tempfile.mkdtemp(prefix="fleetune-fuzz-"))
    for i, name in enumerate(names):  # the first byte picks the target
        (corpus / name).write_bytes(bytes([i]) + SEEDS[name]())
    flags = [a for a in argv[1:] if a.startswith("-")]
    atheris.Setup([argv[0], *flags, str(corpus)], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
