#!/usr/bin/env bash
# Train the video tokenizer with DeepSpeed (two engines: generator and discriminator).
#
#   launch/train.sh                                   # the demo: set up, shard the bundled sample
#                                                     # video, train the demo CPU config on 2 ranks
#   launch/train.sh --config launch/configs/base_128.yaml [key=value ...]     # one node
#   HOSTFILE=hosts NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 launch/train.sh --config ...  # per node
#   deepspeed --no_python --num_gpus 8 launch/train.sh --config ...   # the launcher starts it per rank
#   sbatch launch/train.sbatch --config launch/configs/base_256.yaml                       # SLURM
#
# Environment (defaults in brackets):
#   NPROC_PER_NODE  processes per node [number of GPUs; 2 on a CPU-only machine; with
#                   several nodes, the hostfile's slots]
#   NNODES, NODE_RANK  nodes and this node's rank [1, 0]; several nodes need HOSTFILE and
#                   MASTER_ADDR and start this script once per node (no ssh between nodes)
#   HOSTFILE        DeepSpeed hostfile ("host slots=N" per line) [none: one node]
#   MASTER_ADDR, MASTER_PORT  rendezvous [127.0.0.1, 29500]
#   PYTHON          interpreter [.venv/bin/python if present, else python3]
#   OMP_NUM_THREADS CPU threads per rank [cores / processes on a CPU-only machine; half that
#                   on a GPU node, where the GPU does the math and the other half is left to
#                   the data-loader workers (data.num_workers per rank, one thread each: 2 by
#                   default, 8 in the base configs). Started per rank, the processes per node
#                   come from LOCAL_WORLD_SIZE (torchrun), LOCAL_SIZE (deepspeed) or
#                   SLURM_NTASKS_PER_NODE (srun), else the GPU count. Ranks pinned to their own
#                   cores (srun --cpu-bind) already see only their share: set it yourself]
#   ALLOW_CPU_ON_GPU_NODE=1  start even where torch cannot use this node's GPUs (CPU ranks).
#                   Without it the script stops with the driver's and torch's CUDA versions
#                   when GPUs are visible (nvidia-smi -L lists one, or /dev/nvidia0 exists) but
#                   torch.cuda.is_available() is False, e.g. a CUDA-13 wheel on a CUDA-12
#                   driver. CUDA_VISIBLE_DEVICES set empty (or -1) means CPU on purpose and
#                   skips the check; set non-empty it proves nothing by itself (no driver, no GPU)
#   Everything after the script name goes to `python -m pipeline.train` (`--help`: this text
#   and the trainer's options, without starting anything).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [ -z "${PYTHON:-}" ]; then
    if [ -x "$root/.venv/bin/python" ]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi

# --help: this script's usage and environment, then the trainer's options, printed once here
# (through the launcher every rank would print them) and before any GPU probe.
for arg in "$@"; do
    case "$arg" in
        -h | --help)
            sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
            echo
            echo "The trainer's options (python -m pipeline.train --help):"
            cd "$root"
            exec "$PYTHON" -m pipeline.train --help
            ;;
    esac
done

# Whether this node shows NVIDIA GPUs, usable by torch or not. Device files and nvidia-smi are
# the evidence; CUDA_VISIBLE_DEVICES only vetoes (empty or -1: CPU on purpose; SLURM's
# NoDevFiles: no GPU in this job).
gpus_visible() {
    case "${CUDA_VISIBLE_DEVICES-unset}" in
        "" | -1 | NoDevFiles) return 1 ;;
    esac
    [ -e /dev/nvidia0 ] && return 0
    command -v nvidia-smi >/dev/null || return 1
    local listing
    listing=$(smi -L 2>/dev/null) || true
    [[ $'\n'$listing == *$'\n'"GPU "* ]]
}

smi() {  # a broken driver can hang nvidia-smi
    if command -v timeout >/dev/null; then timeout 30 nvidia-smi "$@"; else nvidia-smi "$@"; fi
}

# One interpreter start: usable GPUs, torch's CUDA and version, and torch's CUDA warnings (on a
# too-new wheel: "The NVIDIA driver on your system is too old").
probe_torch() {
    local out
    if ! out=$("$PYTHON" -c '
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
print("torch-probe", gpus, torch.version.cuda or "none", torch.__version__)
for w in caught:
    text = " ".join(str(w.message).split())
    if "cuda" in text.lower() or "driver" in text.lower():
        print("torch-says", text)
' 2>&1); then
        echo "error: $PYTHON cannot import torch:" >&2
        tail -n 5 <<<"$out" >&2
        exit 2
    fi
    read -r gpus torch_cuda torch_version < <(sed -n 's/^torch-probe //p' <<<"$out") || true
    if [[ ! ${gpus:-} =~ ^[0-9]+$ ]]; then
        echo "error: could not read torch's CUDA state from $PYTHON:" >&2
        tail -n 5 <<<"$out" >&2
        exit 2
    fi
    torch_says=$(sed -n 's/^torch-says //p' <<<"$out" | head -n 2)
}

# GPUs visible but not usable by torch: stop, naming both CUDA versions and the ways out.
cuda_unusable() {
    local driver cuda_max index pip line
    driver=$(smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1) || true
    if [ -z "$driver" ] && [ -r /proc/driver/nvidia/version ]; then
        driver=$(grep -o 'Kernel Module  *[0-9][0-9.]*' /proc/driver/nvidia/version |
            awk '{print $3}') || true
    fi
    cuda_max=$(smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9]*\).*/\1/p' |
        head -n 1) || true
    case ${cuda_max%%.*} in 12) index=cu126 ;; 11) index=cu118 ;; *) index=cu${cuda_max%%.*}X ;; esac
    pip="         $PYTHON -m pip install torch==${torch_version%%+*} --index-url"
    pip+=" https://download.pytorch.org/whl/$index"$'\n'"       (or another index pytorch.org lists"
    pip+=" for that version)"
    {
        echo "error: this node has NVIDIA GPUs, but torch cannot use CUDA"
        echo "  (torch.cuda.is_available() is False): the ranks would silently train on CPU."
        echo "  driver ${driver:-unknown (no nvidia-smi on PATH)}${cuda_max:+, supports CUDA up to $cuda_max}"
        if [ "$torch_cuda" = none ]; then
            echo "  torch $torch_version, a CPU-only build ($PYTHON)"
        else
            echo "  torch $torch_version, built for CUDA $torch_cuda ($PYTHON)"
        fi
        if [ -n "$torch_says" ]; then
            while IFS= read -r line; do echo "  torch says: $line"; done <<<"$torch_says"
        fi
        if [ "$torch_cuda" = none ] && [ -n "$cuda_max" ]; then
            printf '  fix: install a CUDA build of torch, e.g.\n%s\n' "$pip"
        elif [ "$torch_cuda" = none ]; then
            echo "  fix: install a CUDA build of torch for this driver"
        elif [ -z "$cuda_max" ]; then
            echo "  fix: install a torch wheel built for the driver's CUDA, or update the driver"
        elif newer_cuda "$torch_cuda" "$cuda_max"; then
            printf '  fix: install a torch wheel built for CUDA %s.x, e.g.\n%s\n' \
                "${cuda_max%%.*}" "$pip"
            echo "       or update the NVIDIA driver to one for CUDA $torch_cuda."
        else
            echo "  fix: torch's CUDA $torch_cuda fits this driver; look at what torch says, the"
            echo "       GPUs' permissions, CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-} (GPUs this"
            echo "       node lacks?) and nvidia-smi (a driver/library version mismatch?)"
        fi
        echo "  To train on CPU on purpose: ALLOW_CPU_ON_GPU_NODE=1, or CUDA_VISIBLE_DEVICES= (empty)"
        echo "  where launch/train.sh starts the launcher (deepspeed sets it again for its ranks)."
    } >&2
    exit 2
}

newer_cuda() {  # A B: is CUDA version A (major.minor) newer than B?
    [[ $1 =~ ^([0-9]+)\.([0-9]+) ]] || return 1
    local a=$(( 10#${BASH_REMATCH[1]} * 1000 + 10#${BASH_REMATCH[2]} ))
    [[ $2 =~ ^([0-9]+)\.([0-9]+) ]] || return 1
    (( a > 10#${BASH_REMATCH[1]} * 1000 + 10#${BASH_REMATCH[2]} ))
}

# One slice of the cores per rank, or the ranks' thread pools fight; half of it on a GPU node.
thread_share() {  # ranks_on_this_node on_gpu
    local cores share
    cores=$(nproc)
    share=$(( cores / $1 ))
    [ "$2" = 1 ] && share=$(( share / 2 ))
    echo $(( share > 0 ? share : 1 ))
}

# Started once per rank by a launcher (deepspeed --no_python, torchrun; srun with more tasks
# than nodes, i.e. one task per GPU): run the trainer. One srun task per node (as
# launch/train.sbatch starts it) is a node's launcher instead, below.
slurm_tasks=${SLURM_STEP_NUM_TASKS:-${SLURM_NTASKS:-0}}
slurm_nodes=${SLURM_STEP_NUM_NODES:-${SLURM_NNODES:-1}}
per_rank=0
if [ -n "${RANK:-}" ] && [ -n "${LOCAL_RANK:-}" ]; then
    per_rank=1
elif [ -n "${SLURM_PROCID:-}" ] && [ -z "${NODE_RANK:-}" ] && [ "$slurm_tasks" -gt "$slurm_nodes" ]; then
    per_rank=1  # pipeline.distributed.world reads SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the node list
fi
if [ "$per_rank" = 1 ]; then
    if [ "${ALLOW_CPU_ON_GPU_NODE:-}" != 1 ] && gpus_visible; then
        probe_torch
        [ "$gpus" -gt 0 ] || cuda_unusable
        local_ranks=${LOCAL_WORLD_SIZE:-${LOCAL_SIZE:-${SLURM_NTASKS_PER_NODE:-$gpus}}}
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(thread_share "$local_ranks" 1)}
    elif [ -n "${LOCAL_WORLD_SIZE:-${LOCAL_SIZE:-${SLURM_NTASKS_PER_NODE:-}}}" ]; then
        local_ranks=${LOCAL_WORLD_SIZE:-${LOCAL_SIZE:-$SLURM_NTASKS_PER_NODE}}
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(thread_share "$local_ranks" 0)}
    fi
    cd "$root"
    exec "$PYTHON" -m pipeline.train "$@"
fi

if [ $# -eq 0 ]; then
    exec bash "$root/launch/demo.sh"
fi

probe_torch
if [ "$gpus" -eq 0 ] && [ "${ALLOW_CPU_ON_GPU_NODE:-}" != 1 ] && gpus_visible; then
    cuda_unusable
fi
if [ "$gpus" -gt 0 ]; then
    nproc=${NPROC_PER_NODE:-$gpus}
    if [ "$nproc" -gt "$gpus" ]; then
        echo "error: NPROC_PER_NODE=$nproc but torch sees $gpus GPU(s) on this node" >&2
        exit 2
    fi
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(thread_share "$nproc" 1)}
else
    nproc=${NPROC_PER_NODE:-2}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(thread_share "$nproc" 0)}
fi
nnodes=${NNODES:-1}
for arg in "$@"; do  # the estimate of the whole job, printed once, nothing started
    if [ "$arg" = --dry-run ]; then
        cd "$root"
        exec "$PYTHON" -m pipeline.train "$@" --world-size $(( nnodes * nproc ))
    fi
done
launcher=(--master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
if [ "$nnodes" -gt 1 ]; then
    if [ -z "${HOSTFILE:-}" ]; then
        echo "error: NNODES=$nnodes needs HOSTFILE (DeepSpeed hostfile: 'host slots=N' per line)" >&2
        exit 2
    fi
    # Each node starts its own ranks (no ssh or pdsh between nodes): run this script on every
    # node with its NODE_RANK, e.g. from launch/train.sbatch.
    launcher+=(--hostfile "$HOSTFILE" --no_ssh --node_rank "${NODE_RANK:-0}")
    # The hostfile's slots set the ranks per node; NPROC_PER_NODE, where given, overrides them.
    if [ -n "${NPROC_PER_NODE:-}" ]; then launcher+=(--num_gpus "$NPROC_PER_NODE"); fi
elif [ "$gpus" -gt 0 ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    # The DeepSpeed runner drops CUDA_VISIBLE_DEVICES when --num_gpus is given: name the
    # devices instead (the first NPROC_PER_NODE of them).
    IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
    devices=$(IFS=,; echo "${visible[*]:0:$nproc}")
    launcher+=(--include "localhost:$devices")
else
    launcher+=(--num_gpus "$nproc")
fi
deepspeed=$(dirname "$PYTHON")/deepspeed
[ -x "$deepspeed" ] || deepspeed=deepspeed
cd "$root"
# Preemption: SLURM signals every process of the job (SIGTERM on preemption and at the time
# limit, SIGUSR1 from `--signal`). The ranks handle both: they save the step they are at and
# exit with 75. The DeepSpeed runner must outlive them, or the job step ends and takes the
# saving ranks with it, so it ignores both; its per-node launcher forwards SIGTERM to the ranks
# (and SIGKILLs them 30 s later) and ignores SIGUSR1. Ctrl-C (SIGINT) still ends everything.
trap '' TERM USR1
exec "$deepspeed" "${launcher[@]}" --module pipeline.train "$@"
