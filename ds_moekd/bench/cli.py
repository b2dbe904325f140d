"""`ds-moekd bench {moe-layer, teacher, loss, ka, e2e, placement} ...`"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {
        "moe-layer": "ds_moekd.bench.moe_layer",
        "teacher": "ds_moekd.bench.teacher_forward",
        "loss": "ds_moekd.bench.loss",
        "ka": "ds_moekd.bench.ka_draws",
        "e2e": "ds_moekd.bench.e2e",
        "placement": "ds_moekd.bench.placement",
    }
    if not argv or argv[0] not in commands:
        raise SystemExit(f"usage: ds-moekd bench {{{', '.join(commands)}}} [--help]")
    import importlib

    from ds_moekd.runtime.telemetry import phase, setup_logging

    setup_logging(rank=0)
    bench = importlib.import_module(commands[argv[0]])
    if any(a in ("-h", "--help") for a in argv[1:]):
        bench.main(argv[1:])
        return
    with phase(f"bench {argv[0]}", "every implementation is warmed up and timed; the results print at the end"):
        bench.main(argv[1:])


if __name__ == "__main__":
    main()
