"""A throw-away one-node Slurm cluster on localhost (Debian's Slurm 22.05, root, no systemd, no
cgroups), configured as ../shared/SLURM.md verified: its own config, state, spool and munge socket
under one scratch directory, stopped by the PIDs its daemons wrote."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

from megatron_minitron.runtime.dist import free_port

DAEMONS = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged", "mungekey")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}

CONF = """\
ClusterName=ci
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
FirstJobId={first_job}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={R}/munge/munge.socket.2
StateSaveLocation={R}/state
SlurmdSpoolDir={R}/spool
SlurmctldPidFile={R}/run/slurmctld.pid
SlurmdPidFile={R}/run/slurmd.pid
SlurmctldLogFile={R}/log/slurmctld.log
SlurmdLogFile={R}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
EnforcePartLimits=ALL
SlurmdParameters=config_overrides
SchedulerParameters=batch_sched_delay=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def unavailable() -> Optional[str]:
    """Why a cluster cannot be started here, or None."""
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} missing); CI installs it: apt-get install "
                f"slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd launches jobs as their owner)"
    return None


class Cluster:
    """Start with `start()`, submit with the environment `env`, always `stop()`."""

    def __init__(self, root: Path, cpus: int):
        self.root, self.cpus = root, cpus
        self.conf = root / "etc" / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60) -> None:
        r = self.root
        for sub in ("etc", "state", "spool", "run", "log", "munge"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        # munged needs every directory above its socket searchable by all, and none writable by others
        for path in (r, r / "munge"):
            path.chmod(0o755)
        # Own ports and job ids, so two test sessions on one machine neither share daemons nor (through
        # the job id) the rendezvous port of their jobs.
        self.conf.write_text(CONF.format(R=r, cpus=self.cpus, ctld_port=free_port(), slurmd_port=free_port(),
                                         first_job=random.randrange(1000, 1_000_000)))
        key = r / "munge" / "munge.key"
        self._run("mungekey", "-c", "-k", key, "-b", "1024")
        self._run("munged", f"--socket={r}/munge/munge.socket.2", f"--key-file={key}",
                  f"--log-file={r}/log/munged.log", f"--pid-file={r}/run/munged.pid",
                  f"--seed-file={r}/munge/munge.seed")
        self._run("slurmctld", "-f", self.conf)
        self._run("slurmd", "-f", self.conf, "-N", "localhost")
        deadline = time.monotonic() + timeout
        while self.node_state() != "idle":
            if time.monotonic() > deadline:
                raise AssertionError(f"node not idle after {timeout}s (state {self.node_state()!r})\n{self.logs()}")
            time.sleep(0.3)

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = self.root / "run" / f"{name}.pid"
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError, IndexError):
                continue
            for _ in range(100):  # daemons exit within ~2 s
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.05)
            else:
                os.kill(pid, signal.SIGKILL)

    def node_state(self) -> str:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
        return proc.stdout.strip()

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, ExitCode, StdOut, Reason...)."""
        out = self._run("scontrol", "show", "job", "-o", job_id)
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait(self, job_ids: list[str], timeout: float) -> dict[str, dict[str, str]]:
        """Poll until every job is in a terminal state (sbatch --wait polls slowly and misreads cancels)."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = {j: self.job(j) for j in job_ids}
            if all(info["JobState"] in TERMINAL for info in jobs.values()):
                return jobs
            if time.monotonic() > deadline:
                self._run("scancel", *job_ids)
                raise AssertionError(f"jobs not done after {timeout}s: "
                                     f"{ {j: i['JobState'] for j, i in jobs.items()} }\n{self.logs()}")
            time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").glob("*.log")))

    def _run(self, *cmd) -> str:
        proc = subprocess.run([str(c) for c in cmd], env=self.env, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc.stdout
