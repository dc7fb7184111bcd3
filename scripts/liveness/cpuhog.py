#!/usr/bin/env python3
"""Both cores saturated by busy loops beside a 3-replica cluster (release, default
flags) under steady submissions: does the term change? Usage: cpuhog.py SECONDS"""
import json, os, signal, subprocess, sys, time, threading

SECS = int(sys.argv[1]) if len(sys.argv) > 1 else 120
BIN = os.environ.get("DISPATCHER_BIN_DIR", "target/release")
ROOT = "/tmp/cpuhog"
subprocess.run(["rm", "-rf", ROOT]); os.makedirs(ROOT)
ports = {1: 17301, 2: 17302, 3: 17303}
initial = ",".join(f"{i}=127.0.0.1:{p}" for i, p in ports.items())
eps = ",".join(f"127.0.0.1:{p}" for p in ports.values())
procs = {}

def spawn(args, log):
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(log, "a"), start_new_session=True)

def kill(p):
    if p and p.poll() is None and p.pid > 0:
        pg = os.getpgid(p.pid)
        if pg > 0 and pg != os.getpgid(0):
            os.killpg(pg, signal.SIGKILL)
        p.wait()

def ctl(*args, timeout=30):
    r = subprocess.run([f"{BIN}/dispatchctl", "--endpoints", eps, *args], capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout, r.stderr

for i, p in ports.items():
    procs[i] = spawn([f"{BIN}/dispatcher", "--id", str(i), "--listen", f"127.0.0.1:{p}",
        "--initial-cluster", initial, "--data-dir", f"{ROOT}/d{i}"] + os.environ.get("EXTRA", "").split(), f"{ROOT}/r{i}.log")
hogs = []
try:
    while ctl("cluster", "status")[0] != 0: time.sleep(0.2)
    code, out, _ = ctl("-o", "json", "cluster", "status"); s = json.loads(out)
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
            code, out, _ = ctl("-o", "json", "cluster", "status")
            if code == 0:
                st = json.loads(out)
                terms.update(r["term"] for r in st["replicas"] if r["reachable"])
                leaders.add(st["leader_id"])
            time.sleep(1)
    th = threading.Thread(target=poll); th.start()
    while time.time() < stop:
        t = time.time()
        code, _, err = ctl("job", "submit", spec)
        if code == 0: acked += 1; lat.append(time.time() - t)
        else: failed += 1
    th.join()
    lat.sort()
    print(f"{SECS}s with 2 busy loops: {acked} acknowledged, {failed} failed, dispatchctl submit p50 {lat[len(lat)//2]*1000:.0f} ms")
    print(f"term before {term0}, terms seen {sorted(terms)}; leaders seen {sorted(leaders)} (first {leader0})")
finally:
    for h in hogs: kill(h)
    for p in procs.values(): kill(p)
