#!/usr/bin/env bash
# One node of a multi-node `hybrid` run: torchrun with c10d rendezvous, then `python -m distill.cli "$@"`
# in every process. The image installs it as `hybrid-torchrun`; the Indexed Jobs in k8s/ run one per node.
#
#   NNODES          nodes in the run (the Job's completions and parallelism)
#   NPROC_PER_NODE  processes per node, one per GPU (the pod's nvidia.com/gpu limit)
#   RDZV_ENDPOINT   host:port of node 0's rendezvous store (Job pod 0's name under the headless Service)
#   RDZV_ID         one name per run (default: hybrid)
#   JOB_COMPLETION_INDEX  set by Kubernetes in an Indexed Job: node 0 hosts the store
#
# Node 0 is told to host the store (is_host) rather than left to torchrun's guess, which compares the
# endpoint's DNS answer with the pod's addresses and fails while the headless Service has not yet
# published pod 0. torchrun restarts the workers of every node up to MAX_RESTARTS times when one fails;
# the run then resumes from its work directory on the shared volume.
set -euo pipefail
is_host=0
[ "${JOB_COMPLETION_INDEX:-0}" = 0 ] && is_host=1
exec torchrun \
    --nnodes "${NNODES:?set NNODES}" \
    --nproc-per-node "${NPROC_PER_NODE:?set NPROC_PER_NODE}" \
    --rdzv-backend c10d \
    --rdzv-endpoint "${RDZV_ENDPOINT:?set RDZV_ENDPOINT to node 0 host:port}" \
    --rdzv-id "${RDZV_ID:-hybrid}" \
    --rdzv-conf "is_host=${is_host}" \
    --max-restarts "${MAX_RESTARTS:-3}" \
    -m distill.cli "$@"
