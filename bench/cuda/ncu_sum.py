#!/usr/bin/env python3
"""Sum an ncu --csv --metrics gpu__time_duration.sum report by kernel name.

    ncu_sum.py report.csv   -> a table: kernel, launches, total us, share, mean us
"""
import csv
import sys
from collections import defaultdict


def main():
    rows = list(csv.reader(open(sys.argv[1], errors="replace")))
    head = None
    tot = defaultdict(float)
    cnt = defaultdict(int)
    for r in rows:
        if head is None:
            if "Kernel Name" in r and "Metric Value" in r:
                head = {k: i for i, k in enumerate(r)}
            continue
        if len(r) < len(head) or r[head["Metric Name"]] != "gpu__time_duration.sum":
            continue
        name = r[head["Kernel Name"]]
        short = name.split("(")[0].replace("void ", "")[:70]
        v = float(r[head["Metric Value"]].replace(",", ""))  # ns
        tot[short] += v / 1e3
        cnt[short] += 1
    total = sum(tot.values())
    if total == 0:
        print("no kernels in the report")
        return 1
    print(f"{'kernel':70s} {'n':>5s} {'total us':>10s} {'share':>6s} {'mean us':>9s}")
    for k in sorted(tot, key=lambda k: -tot[k]):
        print(f"{k:70s} {cnt[k]:5d} {tot[k]:10.1f} {100 * tot[k] / total:5.1f}% {tot[k] / cnt[k]:9.2f}")
    print(f"{'all':70s} {sum(cnt.values()):5d} {total:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
