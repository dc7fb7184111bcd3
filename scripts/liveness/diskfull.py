#!/usr/bin/env python3
"""Disk full on one replica: its data dir on a small tmpfs. Measures: does it turn
NOT_SERVING and exit non-zero, does the cluster keep serving, does it come back healthy
after restart with space back, and is every acknowledged job present?"""
import json, os, signal, subprocess, sys, time

BIN = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DISPATCHER_BIN_DIR", "target/release")
ROOT = "/tmp/dfull"
subprocess.run(["umount", f"{ROOT}/d3"], stderr=subprocess.DEVNULL)
subprocess.run(["rm", "-rf", ROOT])
os.makedirs(f"{ROOT}/d3")
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", f"{ROOT}/d3"], check=True)
ports = {1: 17101, 2: 17102, 3: 17103}
initial = ",".join(f"{i}=127.0.0.1:{p}" for i, p in ports.items())
eps = ",".join(f"127.0.0.1:{p}" for p in ports.values())
procs = {}

def start(i):
    log = open(f"{ROOT}/r{i}.log", "a")
    d = f"{ROOT}/d{i}" + ("/data" if i == 3 else "")
    procs[i] = subprocess.Popen([f"{BIN}/dispatcher", "--id", str(i), "--listen", f"127.0.0.1:{ports[i]}",
        "--initial-cluster", initial, "--data-dir", d, "--snapshot-after-logs", "200"],
        stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)

def stop(i):
    p = procs.get(i)
    if p and p.poll() is None and p.pid > 0:
        pg = os.getpgid(p.pid)
        if pg > 0 and pg != os.getpgid(0):
            os.killpg(pg, signal.SIGKILL)
        p.wait()

def ctl(*args, ep=eps, timeout=20):
    r = subprocess.run([f"{BIN}/dispatchctl", "--endpoints", ep, *args], capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout, r.stderr

def health(i):
    code, out, err = ctl("health", ep=f"127.0.0.1:{ports[i]}", timeout=5)
    return code, (out + err).strip().splitlines()[-1:] 

spec = f"{ROOT}/big.json"
arg = "x" * 4000
json.dump({"name": "big", "vertices": [{"name": f"v{k}", "parallelism": 1,
    "task": {"command": {"argv": ["/bin/true"] + [arg] * 100}}} for k in range(2)]}, open(spec, "w"))
try:
    for i in ports: start(i)
    t0 = time.time()
    while ctl("cluster", "status")[0] != 0:
        time.sleep(0.2)
    print(f"leader after {time.time()-t0:.1f}s; health of 3: {health(3)}")
    acked = []
    exited_at = None
    t0 = time.time()
    for n in range(400):
        code, out, err = ctl("job", "submit", spec)
        if code == 0:
            acked.append(out.strip())
        else:
            print("submit failed:", err.strip()[:200])
        if procs[3].poll() is not None and exited_at is None:
            exited_at = time.time()
            print(f"replica 3 exited with {procs[3].returncode} after {n+1} submissions ({len(acked)} acknowledged), {exited_at-t0:.1f}s")
            break
        if n % 10 == 0:
            print(f"{n} submitted; replica 3 health {health(3)}; df {subprocess.run(['df','-h',ROOT+'/d3'],capture_output=True,text=True).stdout.splitlines()[-1]}")
    log3 = open(f"{ROOT}/r3.log").read()
    for line in log3.splitlines():
        if "ERROR" in line or "stopped" in line:
            print("r3:", line[:300])
    # The cluster keeps serving.
    code, out, err = ctl("job", "submit", spec)
    print("submit with replica 3 down:", code, (out or err).strip()[:100])
    if code == 0: acked.append(out.strip())
    # Space back: a bigger tmpfs (remount), restart.
    subprocess.run(["mount", "-o", "remount,size=200m", f"{ROOT}/d3"], check=True)
    start(3)
    t0 = time.time()
    while True:
        code, out, err = ctl("-o", "json", "cluster", "status", "--digest")
        if code == 0:
            s = json.loads(out)
            rs = s["replicas"]
            if all(r["reachable"] for r in rs) and len({(r["applied_index"], r["state_digest"]) for r in rs}) == 1:
                print(f"converged {time.time()-t0:.1f}s after the restart with space back; health of 3: {health(3)}")
                break
        if time.time() - t0 > 120:
            print("NOT converged within 120s"); break
        time.sleep(0.5)
    missing = [j for j in acked if ctl("job", "status", "--stale", j, ep=f"127.0.0.1:{ports[3]}")[0] != 0]
    print(f"acknowledged {len(acked)}, missing {len(missing)}")
finally:
    for i in list(procs): stop(i)
    subprocess.run(["umount", f"{ROOT}/d3"])
