#!/usr/bin/env python3
"""Helper of scripts/bench.sh (`make bench`).

  bench.py mkdata PATH full|half     create the backing file (1 GiB of data) or
                                     the convert source (2 GiB, alternating
                                     64 MiB of data and 64 MiB of hole)
  bench.py mkdata-ok PATH full|half  exit 0 if PATH was made by mkdata
  bench.py mark-dirty qed|qcow2 PATH set the image's dirty bit (QED: NEED_CHECK,
                                     0x2 in the LE features field at offset 16;
                                     qcow2 v3: bit 0 of the BE incompatible
                                     features at offset 72)
  bench.py is-dirty qed|qcow2 PATH   exit 0 if the dirty bit is set
  bench.py tree [DOCS]               the tree's label, the commit (with
                                     "-dirty" when it has changes), then its
                                     changes (git status --porcelain lines,
                                     less DOCS/benchmarks.*): see tree_state
  bench.py report RESULTS.tsv ...    print the table and ratios; with --docs DIR
                                     write DIR/benchmarks.md and DIR/benchmarks.png;
                                     --tree LABEL --tree-changes LINES: the
                                     tree measured (default: `bench.py tree`)
"""

import argparse
import datetime
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
MiB = 1024 * 1024
GiB = 1024 * MiB

# id, table label, description (as in issue 8)
WORKLOADS = [
    ("seqalloc-d1", "1 seqalloc d1",
     "1 GiB of 64 KiB writes on a fresh 4 GiB image, depth 1"),
    ("seqalloc-d32", "1 seqalloc d32",
     "1 GiB of 64 KiB writes on a fresh 4 GiB image, depth 32"),
    ("scatter-d1", "2 scatter d1",
     "8,192 4 KiB writes on a fresh 64 GiB image, step 2 GiB - 64 KiB, depth 1"),
    ("scatter-d32", "2 scatter d32",
     "8,192 4 KiB writes on a fresh 64 GiB image, step 2 GiB - 64 KiB, depth 32"),
    ("bigscatter", "3 big scatter d32",
     "65,536 4 KiB writes on a fresh 1 TiB image, step 2 GiB - 448 KiB, depth 32"),
    ("bigscatter-128m", "3 big scatter d32, l2-cache-size=128M",
     "big scatter again, ours opened as production opens it with a 128 MiB "
     "L2 cache (every table of the image): `--image-opts driver=qed,file.filename=IMG,file.aio=native,"
     "file.cache.direct=on,l2-cache-size=128M` (no `-t`/`-i`); peer QED, "
     "qcow2 (its default L2 cache, capped at 32 MiB) and raw run it as in "
     "big scatter"),
    ("rewrite", "4 rewrite d32",
     "1 GiB of 64 KiB writes over allocated clusters, depth 32"),
    ("read", "5 read d32",
     "1 GiB of 4 KiB reads over allocated clusters, depth 32"),
    ("cow", "6 backing COW d32",
     "16,384 4 KiB writes, step 64 KiB, over a 1 GiB raw backing file full "
     "of data, depth 32 (raw: no overlay)"),
    ("check", "7 check",
     "`qemu-img check` of the big-scatter image (raw: no check)"),
    ("dirty-open", "7 dirty open",
     "`qemu-io -c 'read 0 512'` (read-write) of the big-scatter image marked "
     "dirty: the check and repair on open (raw: no dirty bit)"),
    ("convert", "8 convert",
     "`qemu-img convert` of a 2 GiB raw image, alternating 64 MiB data / "
     "64 MiB hole, to the contender's format"),
    # The multiqueue rows (issue 19): tests/qed-mq --bench, see md_workloads
    ("mq-randwrite-t1", "9 mq randwrite, 1 iothread",
     "8,192 4 KiB writes at random 4 KiB-aligned offsets of a fresh 1 GiB "
     "image from 1 iothread, 32 in flight (`qed-mq --bench randwrite "
     "--threads 1 --depth 32`)"),
    ("mq-randwrite-t2", "9 mq randwrite, 2 iothreads",
     "the same from 2 iothreads into the one BlockBackend, 16 in flight "
     "each (`--threads 2 --depth 16`): 32 in all, as with 1"),
    ("mq-read-t1", "9 mq read, 1 iothread",
     "32,768 4 KiB reads at random offsets of a 1 GiB image, filled first "
     "(untimed, 1 MiB writes), from 1 iothread, 32 in flight "
     "(`--bench read`)"),
    ("mq-read-t2", "9 mq read, 2 iothreads",
     "the same from 2 iothreads, 16 in flight each"),
    ("mq-rewrite-alone", "9 mq rewrite, alone",
     "4,096 4 KiB rewrites at random offsets of the first 256 MiB of a "
     "64 GiB image, filled first (untimed), from 1 iothread, 16 in flight, "
     "nothing else running (`qed-mq --bench rewrite-vs-alloc --threads 2 "
     "--depth 16`, its first phase)"),
    ("mq-rewrite-busy", "9 mq rewrite, beside allocations",
     "the same 4,096 rewrites while a second iothread allocates (16 4 KiB "
     "writes in flight at random offsets of [2 GiB, 64 GiB): other L2 "
     "tables than the rewrites') until they are done (its second phase)"),
    ("mq-read-alone", "9 mq read 256M, alone",
     "as mq rewrite, alone, with reads (`--bench read-vs-alloc`)"),
    ("mq-read-busy", "9 mq read 256M, beside allocations",
     "as mq rewrite, beside allocations, with reads"),
]
# Shorter x labels for the chart, where the table's would crowd the next.
CHART_LABELS = {"bigscatter-128m": "big scatter d32, L2 128M",
                "mq-randwrite-t1": "mq randwrite t1",
                "mq-randwrite-t2": "mq randwrite t2",
                "mq-read-t1": "mq read t1", "mq-read-t2": "mq read t2",
                "mq-rewrite-alone": "mq rewrite alone",
                "mq-rewrite-busy": "mq rewrite + alloc",
                "mq-read-alone": "mq read alone",
                "mq-read-busy": "mq read + alloc"}
# Timed by the program's own figure, the whole process's wall clock shown
# apart (the *-vs-alloc rows share one process: not there).
BENCH_WLS = {"seqalloc-d1", "seqalloc-d32", "scatter-d1", "scatter-d32",
             "bigscatter", "bigscatter-128m", "rewrite", "read", "cow",
             "mq-randwrite-t1", "mq-randwrite-t2", "mq-read-t1", "mq-read-t2"}
MQ_WLS = {wl for wl, _, _ in WORKLOADS if wl.startswith("mq-")}
CONTENDERS = [("ours", "ours QED"), ("peer", "peer QED"),
              ("qcow2", "qcow2"), ("raw", "raw")]
OTHERS = ["peer", "qcow2", "raw"]

# (text, workload, against, max ratio ours/against)
TARGETS = [
    ("seqalloc d32 at most 1.5x raw", "seqalloc-d32", "raw", 1.5),
    ("seqalloc d32 at least 4x faster than the peer's QED (<= 0.25x)",
     "seqalloc-d32", "peer", 0.25),
    ("seqalloc d1 at most 1.2x raw", "seqalloc-d1", "raw", 1.2),
    ("scatter d32 at most 2.5x raw", "scatter-d32", "raw", 2.5),
    ("big scatter at most 0.6x raw", "bigscatter", "raw", 0.6),
    ("backing COW at most qcow2's time", "cow", "qcow2", 1.0),
    ("rewrite within 10% of raw (<= 1.1x)", "rewrite", "raw", 1.1),
    ("read within 10% of raw (<= 1.1x)", "read", "raw", 1.1),
    ("check of the big-scatter image no slower than the peer's", "check",
     "peer", 1.0),
    ("dirty open of the big-scatter image no slower than the peer's",
     "dirty-open", "peer", 1.0),
] + [("%s at least as fast as qcow2" % label[2:], wl, "qcow2", 1.0)
     for wl, label, _ in WORKLOADS]

# Ours against ours (issue 19): (text, workload, baseline workload, max
# ratio of ours' medians)
SELF_TARGETS = [
    ("mq randwrite: 2 iothreads no slower than 1 (t2/t1)",
     "mq-randwrite-t2", "mq-randwrite-t1", 1.0),
    ("mq read: 2 iothreads no slower than 1 (t2/t1)",
     "mq-read-t2", "mq-read-t1", 1.0),
]
# The multiqueue table: each contender's time on one row over another's
MQ_RATIOS = [
    ("randwrite: 2 iothreads / 1", "mq-randwrite-t2", "mq-randwrite-t1"),
    ("read: 2 iothreads / 1", "mq-read-t2", "mq-read-t1"),
    ("rewrites: beside allocations / alone", "mq-rewrite-busy",
     "mq-rewrite-alone"),
    ("reads: beside allocations / alone", "mq-read-busy", "mq-read-alone"),
]


# ---------------------------------------------------------------- data files

def mkdata(path, kind):
    stamp = path + ".ok"
    if os.path.exists(stamp):
        os.unlink(stamp)
    block = bytearray(os.urandom(MiB))
    with open(path, "wb") as f:
        if kind == "full":
            regions = [(0, GiB)]
            f.truncate(GiB)
        else:
            f.truncate(2 * GiB)
            regions = [(off, 64 * MiB) for off in range(0, 2 * GiB, 128 * MiB)]
        for start, length in regions:
            f.seek(start)
            for off in range(start, start + length, MiB):
                block[0:8] = struct.pack("<Q", off)  # no two blocks alike
                f.write(block)
        f.flush()
        os.fsync(f.fileno())
    with open(stamp, "w") as f:
        f.write("%s %d\n" % (kind, os.path.getsize(path)))


def mkdata_ok(path, kind):
    size = GiB if kind == "full" else 2 * GiB
    try:
        with open(path + ".ok") as f:
            ok = f.read().split() == [kind, str(size)]
        return ok and os.path.getsize(path) == size
    except OSError:
        return False


# ---------------------------------------------------------------- dirty bits

def dirty_field(fmt, f):
    head = f.read(80)
    if fmt == "qed":
        if head[:4] != b"QED\0":
            sys.exit("not a QED image")
        return 16, "<Q", 0x2
    if fmt == "qcow2":
        if head[:4] != b"QFI\xfb" or struct.unpack(">I", head[4:8])[0] < 3:
            sys.exit("not a qcow2 v3 image")
        return 72, ">Q", 0x1
    sys.exit("no dirty bit in format " + fmt)


def mark_dirty(fmt, path):
    with open(path, "r+b") as f:
        off, pk, bit = dirty_field(fmt, f)
        f.seek(off)
        val = struct.unpack(pk, f.read(8))[0] | bit
        f.seek(off)
        f.write(struct.pack(pk, val))
        f.flush()
        os.fsync(f.fileno())


def is_dirty(fmt, path):
    with open(path, "rb") as f:
        off, pk, bit = dirty_field(fmt, f)
        f.seek(off)
        return bool(struct.unpack(pk, f.read(8))[0] & bit)


# ---------------------------------------------------------------- report

def read_results(path):
    # (wl, c) -> {"secs": [...], "wall": [...], "rss": [KiB...], "modes": set,
    #             "fails": [...]}
    res = {}
    with open(path) as f:
        head = next(f).rstrip("\n").split("\t")
        has_rss = "rss_kib" in head   # results written before RSS was recorded
        for line in f:
            if has_rss:
                wl, c, rep, secs, wall, rss, mode = \
                    line.rstrip("\n").split("\t", 6)
            else:
                wl, c, rep, secs, wall, mode = line.rstrip("\n").split("\t", 5)
                rss = ""
            r = res.setdefault((wl, c), {"secs": [], "wall": [], "rss": [],
                                         "modes": set(), "fails": []})
            if secs == "FAIL":
                r["fails"].append("rep %s: %s" % (rep, mode))
                continue
            r["secs"].append(float(secs))
            try:
                r["wall"].append(float(wall))
            except ValueError:
                pass
            try:
                r["rss"].append(int(rss))
            except ValueError:
                pass
            r["modes"].add(mode.split(";")[0])
            for note in mode.split(";")[1:]:
                r.setdefault("notes", {}).setdefault(note.strip(), []).append(rep)
    return res


def med(r):
    return statistics.median(r["secs"]) if r and r["secs"] else None


def fmt_s(v):
    if v is None:
        return "-"
    return "%.3f" % v if v < 1 else "%.2f" % v if v < 100 else "%.1f" % v


def cell(r, mode, wall=False):
    if not r or not (r["wall"] if wall else r["secs"]):
        return "FAIL" if r and r["fails"] else "-"
    xs = r["wall"] if wall else r["secs"]
    s = fmt_s(statistics.median(xs))
    if len(xs) > 1:
        s += " (%s-%s)" % (fmt_s(min(xs)), fmt_s(max(xs)))
    if r["modes"] - {mode}:
        s += " †"
    return s


def rss_cell(r, mode):
    """Median peak RSS in MiB."""
    if not r or not r["rss"]:
        return "FAIL" if r and r["fails"] and not r["secs"] else "-"
    s = "%.1f" % (statistics.median(r["rss"]) / 1024)
    if r["modes"] - {mode}:
        s += " †"
    return s


def ratio(res, wl, other):
    a, b = med(res.get((wl, "ours"))), med(res.get((wl, other)))
    if a is None or b is None or b == 0:
        return None
    return a / b


def self_ratio(res, wl, base, c="ours"):
    """Contender C's median on WL over its median on BASE."""
    a, b = med(res.get((wl, c))), med(res.get((base, c)))
    if a is None or b is None or b == 0:
        return None
    return a / b


def machine(bench_dir):
    def sh(*cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True,
                                  check=False).stdout
        except OSError:
            return ""
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = "%.1f GiB" % (int(line.split()[1]) / 1024 / 1024)
    opts = sh("findmnt", "-no", "OPTIONS", "-T", bench_dir).strip()
    df = sh("df", "-T", bench_dir).splitlines()
    fs = df[1].split()[1] if len(df) > 1 else "?"
    dev = df[1].split()[0] if len(df) > 1 else "?"
    return {
        "nproc": str(os.cpu_count()),
        "memory": mem,
        "cpu": cpu,
        "kernel": platform.release(),
        "fs": "%s (%s, bench dir %s)" % (fs, dev, bench_dir),
        "opts": opts or "?",
        "load": "%.2f %.2f %.2f" % os.getloadavg(),
    }


def version(binary):
    out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                         check=False).stdout
    return out.splitlines()[0] if out else "?"


def build_type(binary):
    import json
    intro = os.path.join(os.path.dirname(binary), "meson-info",
                         "intro-buildoptions.json")
    try:
        with open(intro) as f:
            o = {x["name"]: x["value"] for x in json.load(f)}
        return "meson buildtype %s, -O%s" % (o.get("buildtype"),
                                             o.get("optimization"))
    except (OSError, ValueError, KeyError):
        return "?"


def tree_state(root, docs):
    """(rev, changes): the commit the binaries are built from, with "-dirty"
    when the tree differs from it, and the differences, `git status
    --porcelain` lines: tracked files changed and untracked files that git
    does not ignore.  The page's own files in DOCS are left out: a run
    rewrites them, and they change nothing it measures.  Outside a git
    checkout (or if git fails) the tree cannot be named: "unknown-dirty"."""
    def git(*args):
        p = subprocess.run(["git", "--no-optional-locks", "-C", root] +
                           list(args), capture_output=True, text=True,
                           check=False)
        return p.stdout if p.returncode == 0 else None
    rev = git("describe", "--always")
    status = git("status", "--porcelain", "--untracked-files=normal")
    if not rev or status is None:
        return "unknown-dirty", ["(%s: not a git checkout, or git failed)" %
                                 root]
    top = os.path.realpath(root)
    own = {os.path.relpath(os.path.join(os.path.realpath(docs), n), top)
           for n in ("benchmarks.md", "benchmarks.png")}
    changes = [x for x in status.splitlines() if x[3:] not in own]
    return rev.strip() + ("-dirty" if changes else ""), changes


def table(res, mode, wall=False, rss=False):
    """(head, rows) of one figure table: the times with their ratios (by
    default), the whole process's wall clock (wall) or the peak RSS (rss)."""
    head = ["workload"] + [n for _, n in CONTENDERS]
    if not wall and not rss:
        head += ["ours/peer", "ours/qcow2", "ours/raw"]
    rows = []
    for wl, label, _ in WORKLOADS:
        if wall and wl not in BENCH_WLS:
            continue
        if not any((wl, c) in res for c, _ in CONTENDERS):
            continue
        if rss:
            row = [label] + [rss_cell(res.get((wl, c)), mode)
                             for c, _ in CONTENDERS]
        else:
            row = [label] + [cell(res.get((wl, c)), mode, wall)
                             for c, _ in CONTENDERS]
        if not wall and not rss:
            for o in OTHERS:
                r = ratio(res, wl, o)
                row.append("-" if r is None else "%.2f" % r)
        rows.append(row)
    return head, rows


def mq_table(res, mode):
    """(head, rows): the multiqueue ratios of each contender (MQ_RATIOS)."""
    cs = [(c, n) for c, n in CONTENDERS if c != "peer"]
    head = ["time ratio (multiqueue)"] + [n for _, n in cs]
    rows = []
    for text, wl, base in MQ_RATIOS:
        rs = [self_ratio(res, wl, base, c) for c, _ in cs]
        if all(r is None for r in rs):
            continue
        marks = ["" if r is None or not (res[(wl, c)]["modes"] |
                                           res[(base, c)]["modes"]) - {mode}
                 else " †" for (c, _), r in zip(cs, rs)]
        rows.append([text] + ["-" if r is None else "%.2f%s" % (r, m)
                              for r, m in zip(rs, marks)])
    return head, rows


def text_table(head, rows):
    w = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(x.ljust(w[i]) if i == 0 else x.rjust(w[i])
                       for i, x in enumerate(r)) for r in [head] + rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def md_table(head, rows):
    out = ["| " + " | ".join(head) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def evaluate(res, mode):
    out = []
    for text, wl, other, limit in TARGETS:
        r = ratio(res, wl, other)
        if r is None:
            verdict = "n/a"
        else:
            verdict = "met" if r <= limit else "**missed**"
            if any(res[(wl, c)]["modes"] - {mode} for c in ("ours", other)):
                verdict += " †"
        out.append((text, "-" if r is None else "%.2f" % r,
                    "%.2f" % limit, verdict))
    for text, wl, base, limit in SELF_TARGETS:
        r = self_ratio(res, wl, base)
        if r is None:
            verdict = "n/a"
        else:
            verdict = "met" if r <= limit else "**missed**"
            if any(res[(w, "ours")]["modes"] - {mode} for w in (wl, base)):
                verdict += " †"
        out.append((text, "-" if r is None else "%.2f" % r,
                    "%.2f" % limit, verdict))
    out.append(("the crash guarantees of the integrity and reliability issues",
                "", "", "not measured here (make check)"))
    return out


def chart(res, png, dirty=""):
    """Bars of ours/contender from 1 (down = ours faster), log scale, with the
    targets of issue 8 as black dashes over the bars they apply to; DIRTY
    (see Figures) ends the title."""
    gp = shutil.which("gnuplot")
    if not gp:
        print("bench: gnuplot missing, no chart", file=sys.stderr)
        return False
    limits = {}
    for _, wl, other, limit in TARGETS:
        k = (wl, other)
        limits[k] = min(limit, limits.get(k, limit))
    with tempfile.TemporaryDirectory() as tmp:
        dat = os.path.join(tmp, "ratios.dat")
        n = 0
        with open(dat, "w") as f:
            for wl, label, _ in WORKLOADS:
                rs = [ratio(res, wl, o) for o in OTHERS]
                if all(r is None for r in rs):
                    continue
                ts = [limits.get((wl, o)) if r is not None else None
                      for o, r in zip(OTHERS, rs)]
                f.write('%d "%s" %s %s\n' % (
                    n, CHART_LABELS.get(wl, label[2:]), " ".join(
                    "-" if r is None else "%.4f" % r for r in rs), " ".join(
                    "-" if t is None else "%.4f" % t for t in ts)))
                n += 1
        if n == 0:
            return False
        series = []
        colors = ["#d95f02", "#1b9e77", "#7570b3"]
        names = ["ours / peer QED", "ours / qcow2", "ours / raw"]
        for i in range(3):
            off = (i - 1) * 0.27
            col = 3 + i
            clip = "(clip(column(%d)))" % col
            series.append(
                '"{dat}" using ($1+{off}):(1):($1+{off}-0.12):($1+{off}+0.12):'
                '(1<{c}?1:{c}):(1<{c}?{c}:1) with boxxyerror fs solid 0.85 '
                'border -1 lc rgb "{color}" title "{name}"'.format(
                    dat=dat, off=off, c=clip, color=colors[i], name=names[i]))
            series.append(
                '"{dat}" using ($1+{off}):({c}*(1<{c}?1.12:0.89)):'
                '(sprintf("%.2f", column({col}))) with labels font ",8" '
                'notitle'.format(dat=dat, off=off, c=clip, col=col))
            series.append(
                '"{dat}" using ($1+{off}):(column({t})):(0.13) with xerrorbars '
                'pt -1 lw 3 lc rgb "black" {title}'.format(
                    dat=dat, off=off, t=6 + i,
                    title='title "target (issue 8)"' if i == 2 else "notitle"))
        subtitle = "\\n" + dirty if dirty else ""
        script = f"""
set terminal pngcairo size 1500,640 font "DejaVu Sans,11"
set output "{png}"
set title "Our QED relative to each contender: time ratio of medians, below 1 = ours faster{subtitle}"
set datafile missing "-"
clip(x) = x < 0.0625 ? 0.0625 : (x > 16 ? 16 : x)
set logscale y 2
set yrange [0.0625:16]
set xrange [-0.6:{n - 0.4}]
set ytics ("1/16" 0.0625, "1/8" 0.125, "1/4" 0.25, "1/2" 0.5, "1" 1, "2" 2, "4" 4, "8" 8, "16" 16)
set grid ytics
set ylabel "ours / contender (log scale)"
set xtics rotate by -25 nomirror
set key top left opaque
set arrow from graph 0, first 1 to graph 1, first 1 nohead lw 1.5 lc rgb "black"
plot "{dat}" using 1:(1/0):xtic(2) notitle, \\
     {", ".join(series)}
"""
        sp = os.path.join(tmp, "chart.gp")
        with open(sp, "w") as f:
            f.write(script)
        p = subprocess.run([gp, sp], capture_output=True, text=True, check=False)
        if p.returncode != 0:
            print("bench: gnuplot failed:\n" + p.stderr, file=sys.stderr)
            return False
    return True


def cut(a):
    return a.planned_reps > a.reps or a.planned_slow_reps > a.slow_reps


class Figures:
    """What the run measured, read once: the results and the figure tables
    that both the console summary and the page show, and the tree they come
    from (a.tree, a.tree_changes: see tree_state).  From an uncommitted tree,
    dirty is the label that every figure table (and the chart) carries."""

    def __init__(self, a):
        self.tree, self.changes = a.tree, a.tree_changes
        self.dirty = ("from an uncommitted tree (%s)" % a.tree
                      if a.tree.endswith("-dirty") else "")
        self.mode = a.mode
        self.res = read_results(a.results)
        self.times = table(self.res, self.mode)
        self.wall = table(self.res, self.mode, wall=True)
        self.rss = table(self.res, self.mode, rss=True)
        self.mq = mq_table(self.res, self.mode)
        self.fails = [(wl, c, f) for (wl, c), r in self.res.items()
                      for f in r["fails"]]
        # Runs that fell back to -t writeback after failing under O_DIRECT
        self.fallbacks = sorted({(wl, c) for (wl, c), r in self.res.items()
                                 if r["modes"] - {self.mode}})
        self.targets = evaluate(self.res, self.mode)
        self.notes = [(wl, c, n, reps) for (wl, c), r in self.res.items()
                      for n, reps in r.get("notes", {}).items()]


# ---------------------------------------------------------------- console

def labelled(head, fig):
    """A figure table's head, its first cell naming an uncommitted tree:
    the label stays with the table wherever it is copied."""
    return [head[0] + ", " + fig.dirty] + head[1:] if fig.dirty else head


def print_tables(fig):
    print()
    if fig.dirty:
        print("bench: every figure below is %s" % fig.dirty)
    print("Median seconds (min-max) of the run; ratios are of medians, "
          "below 1 = ours faster")
    print(text_table(*fig.times))
    print()
    print("Peak RSS, MiB (median; /usr/bin/time %M of the whole process)")
    print(text_table(*fig.rss))
    if fig.mq[1]:
        print()
        print("Multiqueue: each contender's median time on one row over "
              "another's (below 1 = faster)")
        print(text_table(*fig.mq))
    for wl, c in fig.fallbacks:
        print("† %s %s: ran with -t writeback (failed under O_DIRECT)" % (wl, c))
    for wl, c, f in fig.fails:
        print("FAILED %s %s %s" % (wl, c, f))


def print_targets(fig):
    print()
    print("Targets (issue 8; the mq rows: issue 19), ours/contender:")
    for text, r, lim, verdict in fig.targets:
        if verdict != "n/a":
            print("  %-66s %6s  (<= %s)  %s" % (text, r, lim,
                                              verdict.replace("*", ""))
                  if lim else "  %-66s %s" % (text, verdict))


def print_run(a):
    print()
    if cut(a):
        print("bench: %d of %d repetitions, %d of %d of the slow block "
              "(time budget %d s)" % (a.reps, a.planned_reps, a.slow_reps,
                                      a.planned_slow_reps, a.budget))
    print("bench: %d s in the benchmark" % a.runtime)


# ---------------------------------------------------------------- the page

def md_intro(fig):
    md = [
        "# Benchmarks: our QED against the original QED, qcow2 and raw\n",
        "Written by `make bench` (`scripts/bench.sh`, `scripts/bench.py`); "
        "the workloads and targets are those of issue 8, the multiqueue "
        "rows (9) those of issue 19. Re-run `make bench` to refresh this "
        "page.\n",
    ]
    if fig.dirty:
        md.append("**Every figure on this page is %s**: the binaries were "
                  "built from commit %s plus the changes listed under Run, "
                  "which no commit holds (`make bench` writes such a page only "
                  "with BENCH_ALLOW_DIRTY=1). "
                  "Re-run `make bench` from a clean tree before quoting "
                  "them.\n" % (fig.dirty, fig.tree[:-len("-dirty")]))
    return md


def md_tree(fig, most=20):
    """The Run section's tree line: the commit, and what differed from it."""
    if not fig.dirty:
        return ["- tree: %s" % fig.tree]
    md = ["- tree: %s, **uncommitted**: the commit plus these changes "
          "(`git status --porcelain` when the run started):" % fig.tree]
    md += ["  - `%s`" % x for x in fig.changes[:most]]
    if len(fig.changes) > most:
        md.append("  - and %d more" % (len(fig.changes) - most))
    return md


def md_run(a, fig):
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    ref = "our build" if a.ref == "ours" else "the peer's /usr/bin/qemu-img"
    direct = a.mode == "none/native"
    return [
        "## Run\n",
        "- date: %s" % now,
    ] + md_tree(fig) + [
        "- ours: `.base/qemu/build/qemu-img` (%s), the fork's QED, as "
        "`make` builds it (%s)" % (version(a.ours), build_type(a.ours)),
        "- peer QED: `/usr/bin/qemu-img` (%s), the original QED driver" %
        version(a.peer),
        "- qcow2 and raw: run with %s" % ref,
        "- cache: %s for every run%s" % (
            "`-t none -i native` (O_DIRECT)" if direct
            else "`-t writeback` (O_DIRECT was refused on this file system)",
            "; check `-T none`, dirty open `qemu-io -t none -i native`, "
            "convert `-t none -T none`" if direct else ""),
        "- repetitions: %d, alternating the contenders within each "
        "(ours, peer, qcow2, raw, ours, ...); both big scatter rows, "
        "check and dirty open: %d (the slowest)%s" % (a.reps, a.slow_reps,
            "; asked for %d and %d, the time budget of %d s (BENCH_BUDGET) "
            "cut the run short" % (a.planned_reps, a.planned_slow_reps,
                                   a.budget)
            if cut(a) else ""),
        "- time in the benchmark: %d s" % a.runtime,
        "",
    ]


def md_machine(m):
    discard = "discard" in m["opts"].split(",")
    return [
        "## Machine\n",
        "- CPUs (nproc): %s" % m["nproc"],
        "- memory: %s" % m["memory"],
        "- CPU: %s" % m["cpu"],
        "- kernel: %s" % m["kernel"],
        "- file system: %s" % m["fs"],
        "- mount options: %s%s" % (m["opts"], (
            " (with `discard`, deleting an image costs seconds per GiB: that "
            "time counts against the run's time budget, never in a figure)"
            if discard else "")),
        "- load average at the end: %s (other jobs may have run "
        "alongside: the figures can be noisy)" % m["load"],
        "",
    ]


def md_workloads():
    md = ["## Workloads\n"]
    md += ["- **%s**: %s" % (label, desc) for _, label, desc in WORKLOADS]
    md.append("\nEach runs on a fresh image (rewrite and read: the first GiB "
              "of a fresh 4 GiB image is filled first, untimed). `qemu-img "
              "bench` workloads are timed by its own \"Run completed in X "
              "seconds\" line; check, dirty open and convert by "
              "`/usr/bin/time` (wall clock of the whole command); check and "
              "dirty open run several times per repetition (they take about "
              "a second), alternating the contenders. Every run also goes "
              "through `/usr/bin/time` for its peak RSS (see below).\n")
    md.append("The multiqueue rows (9) run `tests/qed-mq/qed-mq --bench` "
              "of our build: 1 or 2 iothreads, each an AioContext in a "
              "thread of its own submitting `blk_co_*` requests straight "
              "into one BlockBackend of the image (as virtio-blk's "
              "`iothread-vq-mapping` does), the node's own context in the "
              "main loop; cache as above (`file.aio=native,"
              "file.cache.direct=on`). They are timed by its own figure "
              "(first request to the completion of the last timed one); "
              "the image is made by our `qemu-img`, and qcow2 and raw run "
              "with the base's drivers in our build whatever BENCH_REF "
              "says. The two rows of a pair \"alone\" / \"beside "
              "allocations\" come from one process (one peak RSS). No "
              "peer QED: 7.2's block layer has no multiqueue, and the "
              "original QED of 10.0 (Debian's qemu-utils 10.0, "
              "`scripts/fetch-peer-10.sh`) has no way to submit to one "
              "image from two iothreads without a guest: in `qemu-img`, "
              "`qemu-io`, `qemu-nbd` and `qemu-storage-daemon` every request "
              "runs in the node's one AioContext (an export's `iothread` is "
              "one name in 10.0's QAPI, and the export moves the node "
              "there); only `qemu-system`'s virtio-blk/virtio-scsi "
              "`iothread-vq-mapping` spreads a node's requests, driven by a "
              "guest.\n")
    return md


def md_times(fig):
    return [
        "## Times\n",
        "Median seconds of the run, (min-max) over the repetitions; ratios "
        "are of medians, below 1 = ours faster. `-` = does not apply.\n",
        md_table(labelled(fig.times[0], fig), fig.times[1]),
    ]


def md_rss(fig):
    return [
        "\n### Peak RSS\n",
        "Peak resident set size of the whole process (`qemu-img`, "
        "`qemu-io` or `qed-mq`, from open to exit) in MiB, median over the same runs as "
        "the times above: `/usr/bin/time`'s `%M`, the most memory the "
        "process ever had in RAM at once (code and libraries it touched, "
        "heap such as the L2 table caches and the request buffers, stacks); "
        "the kernel's page cache is not counted (with O_DIRECT there is none "
        "anyway). `-` = not recorded or does not apply.\n",
        md_table(labelled(fig.rss[0], fig), fig.rss[1]),
    ]


def md_mq(fig):
    if not fig.mq[1]:
        return []
    return [
        "\n### Multiqueue\n",
        "Each contender's median time on one multiqueue row over its "
        "median on another: with 2 iothreads over 1 (the same requests, 32 "
        "in flight in all either way; below 1 = faster with 2), and the "
        "timed rewrites or reads of allocated clusters beside allocations "
        "in other tables over the same alone (above 1 = they waited, for "
        "the CPU or the disk that the allocations take, or behind them).\n",
        md_table(labelled(fig.mq[0], fig), fig.mq[1]),
    ]


def md_caveats(fig):
    """The fallbacks to -t writeback, the notes and the failures."""
    md = ["\n† %s, %s: ran with `-t writeback` after failing under O_DIRECT "
          "(see below); its ratio compares different cache modes." % (wl, c)
          for wl, c in fig.fallbacks]
    if fig.notes:
        md.append("\nNotes:\n")
        for wl, c, n, reps in fig.notes:
            md.append("- %s, %s: %s%s (repetition.run %s)" % (wl, c, n, (
                " (`qemu-img check` found leaked clusters)" if n == "exit 3"
                else ""), ", ".join(reps)))
    if fig.fails:
        md.append("\nFailures:\n")
        md += ["- %s, %s, %s" % f for f in fig.fails]
    return md


def md_wall(fig):
    return [
        "\nWhole `qemu-img bench` (mq rows: `qed-mq`) process (wall clock, "
        "including open and the close, which flushes), median "
        "(min-max):\n",
        md_table(labelled(fig.wall[0], fig), fig.wall[1]),
    ]


def md_targets(fig):
    md = ["\n## Targets (issue 8; ours with 2 iothreads against 1: issue 19)\n",
          "| %s | ours/contender | limit | verdict |" %
          labelled(["target"], fig)[0],
          "|---|---:|---:|---|"]
    md += ["| %s | %s | %s | %s |" % (text, r, ("<= " + lim) if lim else "",
                                      verdict)
           for text, r, lim, verdict in fig.targets]
    return md


def write_docs(a, fig):
    """DIR/benchmarks.md (and the chart, DIR/benchmarks.png, with gnuplot)."""
    os.makedirs(a.docs, exist_ok=True)
    png = os.path.join(a.docs, "benchmarks.png")
    have_png = chart(fig.res, png, fig.dirty)
    md = (md_intro(fig) + md_run(a, fig) + md_machine(machine(a.bench_dir)) +
          md_workloads() + md_times(fig) + md_rss(fig) + md_mq(fig) +
          md_caveats(fig) +
          md_wall(fig) + md_targets(fig))
    if have_png:
        md += ["\n## Chart\n", "![ratios](benchmarks.png)\n"]
    path = os.path.join(a.docs, "benchmarks.md")
    with open(path, "w") as f:
        f.write("\n".join(md) + "\n")
    print("bench: wrote %s%s" % (path, " and " + png if have_png else ""))


def report(a):
    fig = Figures(a)
    print_tables(fig)
    print_targets(fig)
    print_run(a)
    if a.docs:
        write_docs(a, fig)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "mkdata":
        mkdata(args[0], args[1])
    elif cmd == "mkdata-ok":
        sys.exit(0 if mkdata_ok(args[0], args[1]) else 1)
    elif cmd == "mark-dirty":
        mark_dirty(args[0], args[1])
    elif cmd == "is-dirty":
        sys.exit(0 if is_dirty(args[0], args[1]) else 1)
    elif cmd == "tree":
        rev, changes = tree_state(ROOT, args[0] if args else DOCS)
        print("\n".join([rev] + changes))
    elif cmd == "report":
        p = argparse.ArgumentParser(prog="bench.py report")
        p.add_argument("results")
        p.add_argument("--bench-dir", required=True)
        p.add_argument("--reps", type=int, required=True)
        p.add_argument("--slow-reps", type=int, required=True)
        p.add_argument("--planned-reps", type=int, default=0)
        p.add_argument("--planned-slow-reps", type=int, default=0)
        p.add_argument("--budget", type=int, default=0)
        p.add_argument("--ref", default="peer")
        p.add_argument("--mode", default="none/native")
        p.add_argument("--runtime", type=int, default=0)
        p.add_argument("--ours", required=True)
        p.add_argument("--peer", required=True)
        p.add_argument("--docs")
        p.add_argument("--tree", help="the tree's label (see tree_state); "
                       "bench.sh passes the one of the run's start")
        p.add_argument("--tree-changes", default="",
                       help="with --tree: its git status lines")
        a = p.parse_args(args)
        if a.tree:
            a.tree_changes = a.tree_changes.splitlines()
        else:
            a.tree, a.tree_changes = tree_state(ROOT, a.docs or DOCS)
        report(a)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
