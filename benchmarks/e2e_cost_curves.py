"""One table and one plot of `ds-moekd bench e2e` results from several runs (sizes measured
separately, as a large teacher's run takes long): tokens/s and peak memory per rank against the
teacher's size, ours against the authors'-style baseline, `plan`'s predictions beside the peaks.

    python benchmarks/e2e_cost_curves.py OUT RUN_kd.json RUN_ka.json ... 

writes OUT.md and OUT.png.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ds_moekd.bench.e2e import RANDOM_SIZES, phase_table, plot, table, teacher_gb


def main() -> None:
    out, files = Path(sys.argv[1]), [Path(f) for f in sys.argv[2:]]
    results = [r for f in files for r in json.loads(f.read_text())["results"]]
    order = {"kd": 0, "ka": 1, "sar": 2}
    results.sort(key=lambda r: (order.get(r["method"], 9), teacher_gb(r["size"]) if r["size"] in RANDOM_SIZES else 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table(results) + "\n\nWhere the time goes (seconds per step, rank 0):\n\n"
                                      + phase_table(results) + "\n")
    plot(results, out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
