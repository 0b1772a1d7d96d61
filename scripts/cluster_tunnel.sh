#!/usr/bin/env bash
# SSH tunnels to the head: MLflow at http://localhost:5000, Ray dashboard at http://localhost:8265.
#   usage: scripts/cluster_tunnel.sh [cluster.yaml]      (Ctrl-C closes both)
# MLflow listens on the head's private address (not on localhost), so `ray attach -p 5000`, which forwards to
# the head's localhost, cannot reach it; this forwards to the address the head wrote to ~/mlflow/tracking_uri.
# The key is the one `ray up` created (~/.ssh/ray-autoscaler_<region>.pem); set RAY_SSH_KEY to use another.
set -euo pipefail

config=${1:-cluster.yaml}
region=$(python -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["provider"]["region"])' "$config")
key=${RAY_SSH_KEY:-$HOME/.ssh/ray-autoscaler_$region.pem}
[[ -r $key ]] || { echo "no SSH key at $key (set RAY_SSH_KEY to the key 'ray up' printed)" >&2; exit 2; }
head=$(ray get-head-ip "$config" 2>/dev/null | tail -n 1)
ssh_opts=(-i "$key" -o StrictHostKeyChecking=accept-new -o ServerAliveInterval=30)
uri=$(ssh "${ssh_opts[@]}" "ubuntu@$head" cat mlflow/tracking_uri)
private=${uri#http://}
private=${private%:5000}
echo "MLflow: http://localhost:5000   Ray dashboard: http://localhost:8265   (head $head; Ctrl-C to close)"
exec ssh "${ssh_opts[@]}" -N -L "5000:$private:5000" -L 8265:localhost:8265 "ubuntu@$head"
