"""Shared helpers for the liveness scripts: a 3-replica `dispatcher` cluster on loopback,
driven through `dispatchctl`."""
import json, os, signal, subprocess


def kill_group(p):
    """SIGKILL the process group of `p`, a Popen started with start_new_session=True, and reap it."""
    if p is None or p.poll() is not None or p.pid <= 0:
        return
    pg = os.getpgid(p.pid)
    # A new session's leader heads its own group, so pg == p.pid; anything else is not a
    # group this script created, and must never be our own.
    if pg > 0 and pg == p.pid and pg != os.getpgid(0):
        os.killpg(pg, signal.SIGKILL)
        p.wait()


class LoopbackCluster:
    def __init__(self, root, ports, bin_dir, data_dir=None, extra_args=(), ctl_timeout=30):
        """ports: {replica id: port}. data_dir(i) gives replica i's --data-dir (default
        ROOT/d{i}); extra_args are appended to every replica's command line."""
        self.root = root
        self.ports = ports
        self.bin = bin_dir
        self.data_dir = data_dir or (lambda i: f"{root}/d{i}")
        self.extra_args = list(extra_args)
        self.ctl_timeout = ctl_timeout
        self.initial = ",".join(f"{i}=127.0.0.1:{p}" for i, p in ports.items())
        self.eps = ",".join(f"127.0.0.1:{p}" for p in ports.values())
        self.procs = {}

    def ep(self, i):
        return f"127.0.0.1:{self.ports[i]}"

    def log_path(self, i):
        return f"{self.root}/r{i}.log"

    def start(self, i):
        with open(self.log_path(i), "a") as log:
            self.procs[i] = subprocess.Popen(
                [f"{self.bin}/dispatcher", "--id", str(i), "--listen", self.ep(i),
                 "--initial-cluster", self.initial, "--data-dir", self.data_dir(i), *self.extra_args],
                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)

    def kill(self, i):
        kill_group(self.procs.get(i))

    def stop_all(self):
        for i in list(self.procs):
            self.kill(i)

    def ctl(self, *args, ep=None, timeout=None):
        """Run dispatchctl against `ep` (default: all replicas); returns (code, stdout, stderr)."""
        r = subprocess.run([f"{self.bin}/dispatchctl", "--endpoints", ep or self.eps, *args],
                           capture_output=True, text=True, timeout=timeout or self.ctl_timeout)
        return r.returncode, r.stdout, r.stderr

    def status(self, *extra):
        """`cluster status` as parsed JSON, or None if it failed."""
        code, out, _ = self.ctl("-o", "json", "cluster", "status", *extra)
        return json.loads(out) if code == 0 else None

    def health(self, i):
        """Replica i's `health`: (exit code, [last output line])."""
        code, out, err = self.ctl("health", ep=self.ep(i), timeout=5)
        return code, (out + err).strip().splitlines()[-1:]
