#!/usr/bin/env bash
# The MLflow tracking server on the Ray head; cluster.yaml runs it before `ray start --head` (idempotent).
#   usage: scripts/cluster_mlflow.sh s3://YOUR-BUCKET/mlflow
# Runs and metrics: sqlite on the head's disk (~/mlflow/mlflow.db). Artifacts: proxied to S3 by this server
# (--serve-artifacts), so clients (Ray workers, your laptop through the tunnel) need only HTTP access to it,
# never S3 credentials or boto3; only the head's instance profile can write s3://.../mlflow.
# Bound to the head's private address: reachable from the cluster's security group, not from the internet.
set -euo pipefail

artifacts=${1:?usage: $0 s3://BUCKET/PREFIX}
case $artifacts in
s3://YOUR-BUCKET/*) echo "cluster.yaml still says YOUR-BUCKET: replace it with your bucket (README, "Run on a GPU cluster", step 2)" >&2; exit 2 ;;
s3://* | gs://*) ;;
*) echo "expected s3://BUCKET/PREFIX or gs://BUCKET/PREFIX, got '$artifacts'" >&2; exit 2 ;;
esac

state=$HOME/mlflow
mkdir -p "$state"
# The address Ray itself advertises for this node: the private IP of the VPC interface.
ip=$(python -c 'import ray.util; print(ray.util.get_node_ip_address())')
uri="http://$ip:5000"
echo "$uri" >"$state/tracking_uri"

# Every later shell on the head (ray exec, ray attach, `ray start`, hence the DVC driver) gets the URI.
sed -i '/^export MLFLOW_TRACKING_URI=/d' ~/.bashrc
echo "export MLFLOW_TRACKING_URI=$uri" >>~/.bashrc

if curl -fsS "$uri/health" >/dev/null 2>&1; then
    echo "MLflow already serving at $uri"
    exit 0
fi
setsid nohup mlflow server --host "$ip" --port 5000 --workers 2 \
    --backend-store-uri "sqlite:///$state/mlflow.db" \
    --artifacts-destination "$artifacts" --serve-artifacts \
    </dev/null >>"$state/server.log" 2>&1 &
for _ in $(seq 90); do
    if curl -fsS "$uri/health" >/dev/null 2>&1; then
        echo "MLflow serving at $uri (artifacts in $artifacts)"
        exit 0
    fi
    sleep 2
done
echo "MLflow did not answer on $uri/health within 3 minutes; see $state/server.log" >&2
exit 1
