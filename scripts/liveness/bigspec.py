#!/usr/bin/env python3
"""Issue 14's big-spec livelock, with default flags on release builds: 15 submissions of
~3.8 MB, kill -9 a follower, 12 more, restart it. Reports the catch-up time, the terms,
and whether new submissions succeed."""
import json, os, signal, subprocess, sys, time

BIN = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DISPATCHER_BIN_DIR", "target/release")
ROOT = "/tmp/bigspec"
subprocess.run(["rm", "-rf", ROOT]); os.makedirs(ROOT)
ports = {1: 17201, 2: 17202, 3: 17203}
initial = ",".join(f"{i}=127.0.0.1:{p}" for i, p in ports.items())
eps = ",".join(f"127.0.0.1:{p}" for p in ports.values())
procs = {}

def start(i):
    log = open(f"{ROOT}/r{i}.log", "a")
    procs[i] = subprocess.Popen([f"{BIN}/dispatcher", "--id", str(i), "--listen", f"127.0.0.1:{ports[i]}",
        "--initial-cluster", initial, "--data-dir", f"{ROOT}/d{i}"],
        stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)

def kill(i):
    p = procs.get(i)
    if p and p.poll() is None and p.pid > 0:
        pg = os.getpgid(p.pid)
        if pg > 0 and pg != os.getpgid(0):
            os.killpg(pg, signal.SIGKILL)
        p.wait()

def ctl(*args, ep=eps, timeout=30):
    r = subprocess.run([f"{BIN}/dispatchctl", "--endpoints", ep, *args], capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout, r.stderr

def status():
    code, out, _ = ctl("-o", "json", "cluster", "status")
    return json.loads(out) if code == 0 else None

spec = f"{ROOT}/big.json"
arg = "x" * 4000
json.dump({"name": "big", "vertices": [{"name": f"v{k}", "parallelism": 1,
    "task": {"command": {"argv": ["/bin/true"] + [arg] * 189}}} for k in range(5)]}, open(spec, "w"))
print("spec bytes", os.path.getsize(spec))
try:
    for i in ports: start(i)
    while not (s := status()): time.sleep(0.2)
    leader = s["leader_id"]
    follower = next(i for i in ports if i != leader)
    for n in range(15):
        code, out, err = ctl("job", "submit", spec)
        assert code == 0, err
    kill(follower)
    for n in range(12):
        code, out, err = ctl("job", "submit", spec)
        assert code == 0, err
    s = status(); term0 = max(r["term"] for r in s["replicas"] if r["reachable"])
    li = next(r for r in s["replicas"] if r["id"] == leader)["applied_index"]
    print(f"leader {leader} at applied {li}, term {term0}; restarting follower {follower}")
    t0 = time.time(); start(follower)
    caught = None
    while time.time() - t0 < 90:
        s = status()
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
        ok += ctl("job", "submit", small)[0] == 0
    print(f"{ok}/10 new submissions succeeded in {time.time()-t1:.1f} s")
    s = status()
    terms = {r["id"]: (r["role"], r["term"]) for r in s["replicas"]}
    print(f"terms before {term0}, after {terms}; leader {s['leader_id']} (was {leader})")
    for i in ports:
        txt = open(f"{ROOT}/r{i}.log").read()
        print(f"r{i}: {txt.count('timeout')} lines mentioning timeout, {txt.count('election')} mentioning election")
finally:
    for i in list(procs): kill(i)
