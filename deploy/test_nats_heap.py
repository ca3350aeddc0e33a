#!/usr/bin/env python3
"""Tests of deploy/nats-heap.py (run by deploy/test.sh: python3 deploy/test_nats_heap.py)."""

import importlib.util
import math
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

SCRIPT = Path(__file__).with_name("nats-heap.py")
spec = importlib.util.spec_from_file_location("nats_heap", SCRIPT)
nats_heap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(nats_heap)

# Two stacks in Go's text format: one allocating inside the subject tree for the
# stream's index, one in nats-server itself; a third record is a bigger object of
# the first site. The header's rate is twice Go's 512 KiB sampling rate.
PROFILE = """heap profile: 3: 3145728 [9: 9437184] @ heap/1048576
1: 1024 [2: 2048] @ 0x1 0x2 0x3
#\t0x1\truntime.mallocgc+0x10\t/go/src/runtime/malloc.go:1
#\t0x2\tgithub.com/nats-io/nats-server/v2/server/stree.newLeaf[...]+0x20\t/x/stree/leaf.go:1
#\t0x3\tgithub.com/nats-io/nats-server/v2/server.(*fileStore).storeRawMsg+0x6a4\t/x/filestore.go:1

2: 4096 [4: 8192] @ 0x1 0x4
#\t0x1\truntime.mallocgc+0x10\t/go/src/runtime/malloc.go:1
#\t0x4\tgithub.com/nats-io/nats-server/v2/server.getMsgId+0xe4\t/x/stream.go:1

1: 1048576 [1: 1048576] @ 0x1 0x2 0x3
#\t0x1\truntime.mallocgc+0x10\t/go/src/runtime/malloc.go:1
#\t0x2\tgithub.com/nats-io/nats-server/v2/server/stree.newLeaf[...]+0x20\t/x/stree/leaf.go:1
#\t0x3\tgithub.com/nats-io/nats-server/v2/server.(*fileStore).storeRawMsg+0x6a4\t/x/filestore.go:1

0: 0 [5: 5000] @ 0x1 0x4
#\t0x1\truntime.mallocgc+0x10\t/go/src/runtime/malloc.go:1
#\t0x4\tgithub.com/nats-io/nats-server/v2/server.getMsgId+0xe4\t/x/stream.go:1


# runtime.MemStats
# HeapAlloc = 1
"""


def estimate(size, objects, rate=524288):
    return size / (1 - math.exp(-(size / objects) / rate))


class Parse(unittest.TestCase):
    def test_sums_by_site_with_the_sampling_rate(self):
        total, sites = nats_heap.parse(PROFILE.splitlines())
        tree = "stree <- server.(*fileStore).storeRawMsg"
        self.assertEqual(set(sites), {tree, "server.getMsgId"})
        self.assertAlmostEqual(sites[tree], estimate(1024, 1) + estimate(1048576, 1))
        self.assertAlmostEqual(sites["server.getMsgId"], estimate(4096, 2))
        self.assertAlmostEqual(total, sum(sites.values()))
        # a 1 KiB object sampled once stands for ~512 of them
        self.assertGreater(estimate(1024, 1), 500 * 1024)

    def test_refuses_what_is_not_a_heap_profile(self):
        with self.assertRaisesRegex(ValueError, "empty profile"):
            nats_heap.parse([])
        with self.assertRaisesRegex(ValueError, "not a Go text heap profile"):
            nats_heap.parse(["goroutine profile: total 4"])


class Command(unittest.TestCase):
    def run_script(self, *args):
        return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)

    def test_prints_the_top_sites(self):
        with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
            f.write(PROFILE)
            f.flush()
            done = self.run_script(f.name, "1")
        self.assertEqual(done.returncode, 0, done.stderr)
        lines = done.stdout.splitlines()
        self.assertTrue(lines[0].startswith("in use: "))
        self.assertEqual(len(lines), 2)
        self.assertIn("stree <- server.(*fileStore).storeRawMsg", lines[1])

    def test_bad_input_names_what_is_wrong(self):
        self.assertEqual(self.run_script().returncode, 64)
        self.assertEqual(self.run_script("x", "many").returncode, 64)
        missing = self.run_script("/nonexistent/heap.txt")
        self.assertEqual(missing.returncode, 65)
        self.assertIn("/nonexistent/heap.txt", missing.stderr)
        with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
            f.write("goroutine profile: total 4\n")
            f.flush()
            bad = self.run_script(f.name)
        self.assertEqual(bad.returncode, 65)
        self.assertIn("not a Go text heap profile", bad.stderr)


if __name__ == "__main__":
    unittest.main()
