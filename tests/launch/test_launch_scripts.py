"""launch/: the torchrun wrappers' rendezvous and --dry-run (exact per-rank commands), one real
two-rank run through a wrapper, shellcheck, and the rule that Slurm templates hold no cluster settings."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, child_env

LAUNCH = REPO / "launch"
JOBS = ("importance", "prune", "distill", "pretrain", "search")
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("slurm/*"), LAUNCH / "site.env.example", REPO / ".ci" / "run"])
CLEAN = {k: "" for k in ("NNODES", "NODE_RANK", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "RDZV_ENDPOINT",
                         "RDZV_ID", "SLURM_NNODES", "SLURM_NODEID", "SLURM_JOB_ID")}


def _launch(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in {**child_env(), **CLEAN, "PYTHON": "python3", **env}.items() if v != ""}
    return subprocess.run(["bash", str(LAUNCH / script), *args], env=full, capture_output=True, text=True, timeout=600)


def _ranks(output: str) -> list[tuple[dict[str, str], list[str]]]:
    """The per-rank lines of a dry run, each as (environment, argv)."""
    ranks = []
    for line in output.splitlines():
        if line.startswith("RANK="):
            words = shlex.split(line)
            env = dict(w.split("=", 1) for w in words[:5])
            ranks.append((env, words[5:]))
    return ranks


@pytest.mark.parametrize("job", JOBS)
def test_single_node_dry_run_prints_each_ranks_exact_command(job):
    odd = ["--out", "/a dir/with 'quotes'", "--data-path", "0.3", "/d/x$HOME"]
    proc = _launch(f"{job}.sh", "--dry-run", *odd, NPROC_PER_NODE="3")
    assert proc.returncode == 0, proc.stderr
    torchrun = shlex.split(proc.stdout.splitlines()[1])
    assert torchrun == ["python3", "-m", "torch.distributed.run", "--nproc-per-node", "3", "--standalone", "-m",
                        "megatron_minitron", job, *odd]
    ranks = _ranks(proc.stdout)
    assert [env["RANK"] for env, _ in ranks] == ["0", "1", "2"]
    assert all(env["WORLD_SIZE"] == "3" and argv == ["python3", "-m", "megatron_minitron", job, *odd]
               for env, argv in ranks)


def test_multi_node_static_rendezvous_from_env_and_slurm_vars():
    proc = _launch("distill.sh", "--dry-run", "--tp", "4", NPROC_PER_NODE="4", NNODES="2", NODE_RANK="1",
                   MASTER_ADDR="10.0.0.7", MASTER_PORT="29511")
    assert proc.returncode == 0, proc.stderr
    assert "--nnodes 2 --node-rank 1 --master-addr 10.0.0.7 --master-port 29511" in proc.stdout
    ranks = _ranks(proc.stdout)
    assert [(e["RANK"], e["LOCAL_RANK"]) for e, _ in ranks] == [("4", "0"), ("5", "1"), ("6", "2"), ("7", "3")]
    assert {(e["WORLD_SIZE"], e["MASTER_ADDR"], e["MASTER_PORT"]) for e, _ in ranks} == {("8", "10.0.0.7", "29511")}
    # inside an allocation the node count and index come from Slurm when not given
    proc = _launch("importance.sh", "--dry-run", NPROC_PER_NODE="2", SLURM_NNODES="3", SLURM_NODEID="2",
                   MASTER_ADDR="n0")
    assert [e["RANK"] for e, _ in _ranks(proc.stdout)] == ["4", "5"] and "--nnodes 3 --node-rank 2" in proc.stdout


def test_c10d_endpoint_and_missing_rendezvous():
    proc = _launch("pretrain.sh", "--dry-run", NNODES="4", NPROC_PER_NODE="8", RDZV_ENDPOINT="head:29400",
                   SLURM_JOB_ID="77")
    assert "--nnodes 4 --rdzv-backend c10d --rdzv-endpoint head:29400 --rdzv-id 77" in proc.stdout
    assert "--node-rank" not in proc.stdout and _ranks(proc.stdout)[0][0]["RANK"] == "<assigned-at-rendezvous>"
    proc = _launch("prune.sh", "--dry-run", NNODES="2")
    assert proc.returncode != 0 and "NNODES=2 needs MASTER_ADDR" in proc.stderr and not proc.stdout
    proc = _launch("torchrun.sh", "--dry-run")
    assert proc.returncode == 2 and "usage:" in proc.stderr


def test_sbatch_wrapper_refuses_a_missing_site_file(tmp_path):
    proc = _launch("sbatch.sh", "launch/slurm/prune.sbatch", MINITRON_SITE=str(tmp_path / "nope.env"))
    assert proc.returncode == 2 and "site.env.example" in proc.stderr


def test_templates_hold_no_cluster_settings():
    site_only = re.compile(r"--(partition|account|time|qos|container|gres|gpus)|\bNCCL_|\bSBATCH_|#SBATCH -[pAt]\b")
    templates = sorted(LAUNCH.glob("slurm/*"))
    assert {p.name for p in templates} >= {"importance.sbatch", "prune.sbatch", "distill.sbatch", "search.sbatch",
                                           "common.sh"}
    for path in templates:
        code = [line for line in path.read_text().splitlines() if not line.startswith("# ") or
                line.startswith("#SBATCH")]
        hits = [line for line in code if site_only.search(re.sub(r'"[^"]*"', "", line))]  # messages may name them
        assert not hits, f"{path.name}: cluster-specific settings belong in launch/site.env.example: {hits}"
    site = (LAUNCH / "site.env.example").read_text()
    assert all(name in site for name in ("SBATCH_PARTITION", "SBATCH_ACCOUNT", "SBATCH_TIMELIMIT",
                                         "MINITRON_SRUN_ARGS", "--container-image", "--container-mounts", "NCCL_"))


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_shellcheck_clean():
    proc = subprocess.run(["shellcheck", "-x", *map(str, (p.relative_to(REPO) for p in SCRIPTS))], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_ci_installs_slurm_then_runs_exactly_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert "slurmctld slurmd slurm-client munge" in ci and "apt-get install" in ci
    assert ci.rstrip().splitlines()[-1] == "bash scripts/test.sh"
    assert "bash scripts/test.sh" in (REPO / "README.md").read_text()


def test_a_real_two_rank_run_through_the_wrapper(tiny_teacher, data_cache, tmp_path):
    from megatron_minitron.importance.scores import load_scores

    out = tmp_path / "scores"
    proc = _launch("importance.sh", "--load", str(tiny_teacher), "--out", str(out), "--tp", "2", "--num-samples",
                   "8", "--seq-length", "64", "--cache-dir", str(data_cache), NPROC_PER_NODE="2",
                   PYTHON=sys.executable)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert load_scores(out).manifest.layout["tp"] == 2
