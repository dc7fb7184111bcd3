#!/usr/bin/env python3
"""Disk full on one replica: its data dir on a small tmpfs. Measures: does it turn
NOT_SERVING and exit non-zero, does the cluster keep serving, does it come back healthy
after restart with space back, and is every acknowledged job present?"""
import json, os, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loopback import LoopbackCluster

BIN = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DISPATCHER_BIN_DIR", "target/release")
ROOT = "/tmp/dfull"
subprocess.run(["umount", f"{ROOT}/d3"], stderr=subprocess.DEVNULL)
subprocess.run(["rm", "-rf", ROOT])
os.makedirs(f"{ROOT}/d3")
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", f"{ROOT}/d3"], check=True)
ports = {1: 17101, 2: 17102, 3: 17103}
# Replica 3's data lives in a subdirectory of the tmpfs mount point.
c = LoopbackCluster(ROOT, ports, BIN, data_dir=lambda i: f"{ROOT}/d{i}" + ("/data" if i == 3 else ""),
                    extra_args=["--snapshot-after-logs", "200"], ctl_timeout=20)

spec = f"{ROOT}/big.json"
arg = "x" * 4000
json.dump({"name": "big", "vertices": [{"name": f"v{k}", "parallelism": 1,
    "task": {"command": {"argv": ["/bin/true"] + [arg] * 100}}} for k in range(2)]}, open(spec, "w"))
try:
    for i in ports: c.start(i)
    t0 = time.time()
    while c.ctl("cluster", "status")[0] != 0:
        time.sleep(0.2)
    print(f"leader after {time.time()-t0:.1f}s; health of 3: {c.health(3)}")
    acked = []
    exited_at = None
    t0 = time.time()
    for n in range(400):
        code, out, err = c.ctl("job", "submit", spec)
        if code == 0:
            acked.append(out.strip())
        else:
            print("submit failed:", err.strip()[:200])
        if c.procs[3].poll() is not None and exited_at is None:
            exited_at = time.time()
            print(f"replica 3 exited with {c.procs[3].returncode} after {n+1} submissions ({len(acked)} acknowledged), {exited_at-t0:.1f}s")
            break
        if n % 10 == 0:
            print(f"{n} submitted; replica 3 health {c.health(3)}; df {subprocess.run(['df','-h',ROOT+'/d3'],capture_output=True,text=True).stdout.splitlines()[-1]}")
    log3 = open(c.log_path(3)).read()
    for line in log3.splitlines():
        if "ERROR" in line or "stopped" in line:
            print("r3:", line[:300])
    # The cluster keeps serving.
    code, out, err = c.ctl("job", "submit", spec)
    print("submit with replica 3 down:", code, (out or err).strip()[:100])
    if code == 0: acked.append(out.strip())
    # Space back: a bigger tmpfs (remount), restart.
    subprocess.run(["mount", "-o", "remount,size=200m", f"{ROOT}/d3"], check=True)
    c.start(3)
    t0 = time.time()
    while True:
        s = c.status("--digest")
        if s:
            rs = s["replicas"]
            if all(r["reachable"] for r in rs) and len({(r["applied_index"], r["state_digest"]) for r in rs}) == 1:
                print(f"converged {time.time()-t0:.1f}s after the restart with space back; health of 3: {c.health(3)}")
                break
        if time.time() - t0 > 120:
            print("NOT converged within 120s"); break
        time.sleep(0.5)
    missing = [j for j in acked if c.ctl("job", "status", "--stale", j, ep=c.ep(3))[0] != 0]
    print(f"acknowledged {len(acked)}, missing {len(missing)}")
finally:
    c.stop_all()
    subprocess.run(["umount", f"{ROOT}/d3"])
