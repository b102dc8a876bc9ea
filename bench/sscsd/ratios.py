"""Per-round ratios SSCSD / ScopeHold from bench/sscsd/run.sh's outputs, and
their medians. > 1 means ScopeHold is faster (latency) or smaller (memory);
for mounts per second the ratio is ScopeHold / SSCSD."""
import glob
import os
import re
import statistics
import sys


def rows(path):
    out = {}
    for line in open(path):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0] and not cells[0].startswith("-"):
            out[cells[0]] = cells[1:]
    return out


def find(table, prefix):
    for k, v in table.items():
        if k.startswith(prefix):
            return v
    raise KeyError(prefix)


def latency(table, prefix):
    v = find(table, prefix)
    return float(v[1]), float(v[3])  # p50, p99


def figure(table, prefix):
    return float(re.split(r"[ /]", find(table, prefix)[0].strip())[0])


def measures(table):
    m = {}
    m["c=1 p50"], m["c=1 p99"] = latency(table, "publish, c=1 (")
    m["c=32 p50"], m["c=32 p99"] = latency(table, "publish, c=32 (")
    m["c=1 500 mounted p50"], m["c=1 500 mounted p99"] = latency(table, "publish, c=1, ")
    m["cold publish"] = latency(table, "publish, first")[0]
    m["mounts/s c=32"] = figure(table, "publish c=32: mounts per second")
    m["mounts/s c=1"] = figure(table, "publish c=1: mounts per second")
    m["node RSS MiB"] = figure(table, "node plugin VmRSS")
    m["load"] = find(table, "load average")[0]
    return m


def main(run):
    rounds = sorted(int(os.path.basename(p)[1:-4]) for p in glob.glob(f"{run}/A*.out"))
    if os.path.exists(f"{run}/machine.txt"):
        print(open(f"{run}/machine.txt").read().strip())
    ratios = {}
    print("| round | side | c=1 p50/p99 | c=32 p50/p99 | c=1 500 mnt p50/p99 | cold | mounts/s c=32 / c=1 | node RSS MiB | load before / during |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i in rounds:
        try:
            a, b = measures(rows(f"{run}/A{i}.out")), measures(rows(f"{run}/B{i}.out"))
        except (KeyError, FileNotFoundError, ValueError) as e:
            print(f"| {i} | incomplete ({e}) |")
            continue
        for side, m in (("ScopeHold", a), ("SSCSD", b)):
            print(f"| {i} | {side} | {m['c=1 p50']:.1f}/{m['c=1 p99']:.1f} | {m['c=32 p50']:.1f}/{m['c=32 p99']:.1f} "
                  f"| {m['c=1 500 mounted p50']:.1f}/{m['c=1 500 mounted p99']:.1f} | {m['cold publish']:.1f} "
                  f"| {m['mounts/s c=32']:.0f} / {m['mounts/s c=1']:.0f} | {m['node RSS MiB']:.1f} | {m['load']} |")
        for k in ["c=1 p50", "c=1 p99", "c=32 p50", "c=32 p99", "c=1 500 mounted p50",
                  "c=1 500 mounted p99", "cold publish", "node RSS MiB"]:
            ratios.setdefault(k, []).append(b[k] / a[k])
        for k in ["mounts/s c=32", "mounts/s c=1"]:
            ratios.setdefault(k + " (ScopeHold/SSCSD)", []).append(a[k] / b[k])
    print()
    print("ratios SSCSD / ScopeHold per round (> 1: ScopeHold better)")
    for k, vs in ratios.items():
        print(f"  {k:34s} {' '.join(f'{v:5.2f}' for v in vs)}   median {statistics.median(vs):.2f}   min {min(vs):.2f}")


if __name__ == "__main__":
    main(sys.argv[1])
