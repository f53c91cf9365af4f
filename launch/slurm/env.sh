# Source this file to point SLURM clients (sinfo, sbatch, submitit) at the local test cluster
# started by launch/slurm/cluster.sh:   . launch/slurm/env.sh
_detrforge_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export DETRFORGE_SLURM_HOME=${DETRFORGE_SLURM_HOME:-$_detrforge_repo/.cache/slurm}
export SLURM_CONF=$DETRFORGE_SLURM_HOME/etc/slurm.conf
case ":$PATH:" in *:/usr/sbin:*) ;; *) export PATH=$PATH:/usr/sbin ;; esac
unset _detrforge_repo
