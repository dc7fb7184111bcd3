#!/usr/bin/env python3
"""Issue 14's big-spec livelock, with default flags on release builds: 15 submissions of
~3.8 MB, kill -9 a follower, 12 more, restart it. Reports the catch-up time, the terms,
and whether new submissions succeed."""
import json, os, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loopback import LoopbackCluster

BIN = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DISPATCHER_BIN_DIR", "target/release")
ROOT = "/tmp/bigspec"
subprocess.run(["rm", "-rf", ROOT]); os.makedirs(ROOT)
ports = {1: 17201, 2: 17202, 3: 17203}
c = LoopbackCluster(ROOT, ports, BIN)

spec = f"{ROOT}/big.json"
arg = "x" * 4000
json.dump({"name": "big", "vertices": [{"name": f"v{k}", "parallelism": 1,
    "task": {"command": {"argv": ["/bin/true"] + [arg] * 189}}} for k in range(5)]}, open(spec, "w"))
print("spec bytes", os.path.getsize(spec))
try:
    for i in ports: c.start(i)
    while not (s := c.status()): time.sleep(0.2)
    leader = s["leader_id"]
    follower = next(i for i in ports if i != leader)
    for n in range(15):
        code, out, err = c.ctl("job", "submit", spec)
        assert code == 0, err
    c.kill(follower)
    for n in range(12):
        code, out, err = c.ctl("job", "submit", spec)
        assert code == 0, err
    s = c.status(); term0 = max(r["term"] for r in s["replicas"] if r["reachable"])
    li = next(r for r in s["replicas"] if r["id"] == leader)["applied_index"]
    print(f"leader {leader} at applied {li}, term {term0}; restarting follower {follower}")
    t0 = time.time(); c.start(follower)
    caught = None
    while time.time() - t0 < 90:
        s = c.status()
        if s:
            f = next(r for r in s["replicas"] if r["id"] == follower)
            if f["reachable"] and f["applied_index"] >= li:
                caught = time.time() - t0; break
        time.sleep(0.1)
    print(f"follower caught up after {caught and round(caught, 2)} s")
    ok = 0; t1 = time.time()
    small = f"{ROOT}/small.json"
    json.dump({"name": "small", "vertices": [{"name": "v", "parallelism": 1, "task": {"sleep": {"duration_ms": 1000}}}]}, open(small, "w"))
    for n in range(10):
        ok += c.ctl("job", "submit", small)[0] == 0
    print(f"{ok}/10 new submissions succeeded in {time.time()-t1:.1f} s")
    s = c.status()
    terms = {r["id"]: (r["role"], r["term"]) for r in s["replicas"]}
    print(f"terms before {term0}, after {terms}; leader {s['leader_id']} (was {leader})")
    for i in ports:
        txt = open(c.log_path(i)).read()
        print(f"r{i}: {txt.count('timeout')} lines mentioning timeout, {txt.count('election')} mentioning election")
finally:
    c.stop_all()
