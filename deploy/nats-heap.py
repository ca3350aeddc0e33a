#!/usr/bin/env python3
"""Where nats-server's live heap goes: one Go heap profile, summed by allocation site.

Reads the text heap profile nats-server serves on its `prof_port`
(`/debug/pprof/heap?debug=1`; `JETSAGA_LOCAL_NATS_PROF_PORT=PORT deploy/run-local.sh`
starts it with one) and prints the in-use bytes, estimated from the samples, grouped
by the first nats-server function that allocated them. Allocations made inside the
subject tree (`stree`), the TTL wheel (`thw`) or the sequence sets (`avl`) are named
by that package and the nats-server function that called it, so the stream's own
per-subject index (`fileStore.storeRawMsg`) and a block's (`msgBlock.writeMsgRecordLocked`)
stand apart.

Usage:
  curl -s 'http://127.0.0.1:PORT/debug/pprof/heap?debug=1' > heap.txt
  deploy/nats-heap.py heap.txt [TOP]     # TOP sites, 15 by default

The estimate: a site's sampled bytes over the chance that an allocation of its mean
size was sampled, 1 - exp(-size / rate). The profile's header gives twice the
sampling rate (`heap/1048576` for Go's default 512 KiB), a convention of Go's text
format. The totals are live bytes at the last garbage collection, not resident memory.
"""

import math
import re
import sys
from collections import Counter

RECORD = re.compile(r"\s*(\d+): (\d+) \[(\d+): (\d+)\] @")
PACKAGES = ("stree.", "thw.", "avl.")


def site(frames):
    """The name a record's stack is summed under."""
    ours = [f.rsplit("/", 1)[-1] for f in frames if not f.startswith("runtime.")]
    inner = next((f for f in ours if f.startswith(PACKAGES)), None)
    caller = next((f for f in ours if f.startswith("server.")), ours[0] if ours else "?")
    caller = re.sub(r"\+0x[0-9a-f]+$", "", caller)
    if inner is None:
        return caller
    return f"{inner.split('.', 1)[0]} <- {caller}"


def parse(lines):
    """(in-use bytes in all, Counter of in-use bytes by site)."""
    if not lines:
        raise ValueError("empty profile")
    header = re.search(r"@ heap/(\d+)", lines[0])
    if header is None:
        raise ValueError(f"not a Go text heap profile: {lines[0][:80]!r}")
    rate = int(header.group(1)) / 2
    sites = Counter()
    i = 1
    while i < len(lines):
        record = RECORD.match(lines[i])
        if record is None:
            if lines[i].startswith("# runtime.MemStats"):
                break
            i += 1
            continue
        objects, size = int(record.group(1)), int(record.group(2))
        frames = []
        i += 1
        while i < len(lines) and lines[i].startswith("#\t"):
            parts = lines[i].split()
            if len(parts) >= 3:
                frames.append(parts[2])
            i += 1
        if objects:
            sites[site(frames)] += size / (1 - math.exp(-(size / objects) / rate))
    return sum(sites.values()), sites


def main(argv):
    if len(argv) not in (2, 3) or (len(argv) == 3 and not argv[2].isdigit()):
        print(__doc__.split("Usage:")[1].split("The estimate")[0].rstrip(), file=sys.stderr)
        return 64
    try:
        with open(argv[1], encoding="utf-8") as f:
            total, sites = parse(f.read().splitlines())
    except (OSError, ValueError) as e:
        print(f"nats-heap: {argv[1]}: {e}", file=sys.stderr)
        return 65
    top = int(argv[2]) if len(argv) == 3 else 15
    print(f"in use: {total / 1e6:.1f} MB")
    for name, size in sites.most_common(top):
        print(f"{size / 1e6:9.1f} MB {100 * size / total:5.1f} %  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
