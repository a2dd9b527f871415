#!/usr/bin/env bash
# Train the video tokenizer with DeepSpeed (two engines: generator and discriminator).
#
#   launch/train.sh                                   # the demo: set up, shard the bundled sample
#                                                     # video, train the tiny CPU config on 2 ranks
#   launch/train.sh --config launch/configs/base_128.yaml [key=value ...]     # one node
#   HOSTFILE=hosts NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 launch/train.sh --config ...  # per node
#   deepspeed --no_python --num_gpus 8 launch/train.sh --config ...   # the launcher starts it per rank
#   sbatch launch/train.sbatch --config launch/configs/base_256.yaml                       # SLURM
#
# Environment (defaults in brackets):
#   NPROC_PER_NODE  processes per node [number of GPUs; 2 on a CPU-only machine]
#   NNODES, NODE_RANK  nodes and this node's rank [1, 0]; several nodes need HOSTFILE and
#                   MASTER_ADDR and start this script once per node (no ssh between nodes)
#   HOSTFILE        DeepSpeed hostfile ("host slots=N" per line) [none: one node]
#   MASTER_ADDR, MASTER_PORT  rendezvous [127.0.0.1, 29500]
#   PYTHON          interpreter [.venv/bin/python if present, else python3]
#   OMP_NUM_THREADS CPU threads per rank [cores / processes on a CPU-only machine]
#   Everything after the script name goes to `python -m pipeline.train`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [ -z "${PYTHON:-}" ]; then
    if [ -x "$root/.venv/bin/python" ]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi

# Started once per rank by a launcher (deepspeed --no_python, torchrun, srun): run the trainer.
if [ -n "${RANK:-}" ] && [ -n "${LOCAL_RANK:-}" ]; then
    cd "$root"
    exec "$PYTHON" -m pipeline.train "$@"
fi

if [ $# -eq 0 ]; then
    exec bash "$root/launch/demo.sh"
fi

has_gpu=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$has_gpu" -gt 0 ]; then
    nproc=${NPROC_PER_NODE:-$has_gpu}
else
    nproc=${NPROC_PER_NODE:-2}
    # gloo on CPU: one slice of the cores per rank, or the ranks' thread pools fight.
    cores=$(nproc)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / nproc > 0 ? cores / nproc : 1 ))}
fi
nnodes=${NNODES:-1}
launcher=(--master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
if [ "$nnodes" -gt 1 ]; then
    if [ -z "${HOSTFILE:-}" ]; then
        echo "error: NNODES=$nnodes needs HOSTFILE (DeepSpeed hostfile: 'host slots=N' per line)" >&2
        exit 2
    fi
    # Each node starts its own ranks (no ssh or pdsh between nodes): run this script on every
    # node with its NODE_RANK, e.g. from launch/train.sbatch.
    launcher+=(--hostfile "$HOSTFILE" --no_ssh --node_rank "${NODE_RANK:-0}")
else
    launcher+=(--num_gpus "$nproc")
fi
deepspeed=$(dirname "$PYTHON")/deepspeed
[ -x "$deepspeed" ] || deepspeed=deepspeed
cd "$root"
exec "$deepspeed" "${launcher[@]}" --module pipeline.train "$@"
