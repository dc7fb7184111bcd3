#!/usr/bin/env python3
"""Both cores saturated by busy loops beside a 3-replica cluster (release, default
flags) under steady submissions: does the term change? Usage: cpuhog.py SECONDS"""
import json, os, subprocess, sys, time, threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loopback import LoopbackCluster, kill_group

SECS = int(sys.argv[1]) if len(sys.argv) > 1 else 120
BIN = os.environ.get("DISPATCHER_BIN_DIR", "target/release")
ROOT = "/tmp/cpuhog"
subprocess.run(["rm", "-rf", ROOT]); os.makedirs(ROOT)
ports = {1: 17301, 2: 17302, 3: 17303}
c = LoopbackCluster(ROOT, ports, BIN, extra_args=os.environ.get("EXTRA", "").split())
hogs = []
try:
    for i in ports: c.start(i)
    while c.ctl("cluster", "status")[0] != 0: time.sleep(0.2)
    s = c.status()
    term0, leader0 = max(r["term"] for r in s["replicas"]), s["leader_id"]
    for _ in range(2):
        hogs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True))
    spec = f"{ROOT}/small.json"
    json.dump({"name": "small", "vertices": [{"name": "v", "parallelism": 1, "task": {"sleep": {"duration_ms": 1000}}}]}, open(spec, "w"))
    stop = time.time() + SECS
    acked = failed = 0; lat = []
    terms = set(); leaders = set()
    def poll():
        while time.time() < stop:
            st = c.status()
            if st:
                terms.update(r["term"] for r in st["replicas"] if r["reachable"])
                leaders.add(st["leader_id"])
            time.sleep(1)
    th = threading.Thread(target=poll); th.start()
    while time.time() < stop:
        t = time.time()
        code, _, err = c.ctl("job", "submit", spec)
        if code == 0: acked += 1; lat.append(time.time() - t)
        else: failed += 1
    th.join()
    lat.sort()
    print(f"{SECS}s with 2 busy loops: {acked} acknowledged, {failed} failed, dispatchctl submit p50 {lat[len(lat)//2]*1000:.0f} ms")
    print(f"term before {term0}, terms seen {sorted(terms)}; leaders seen {sorted(leaders)} (first {leader0})")
finally:
    for h in hogs: kill_group(h)
    c.stop_all()
