#!/usr/bin/env bash
# Creates the two IAM instance profiles cluster.yaml names, scoped to one bucket (run once per AWS account).
#   usage: scripts/cluster_iam.sh my-bucket
#   transformer-wmt-node: read/write s3://my-bucket only (GPU workers: Ray checkpoints; nothing else).
#   transformer-wmt-head: the same S3 access, EC2 (Ray's autoscaler launches and terminates workers), and
#                         iam:PassRole for the node role only (to give workers their profile).
# Idempotent: existing roles and profiles are kept and their policies rewritten. Uses your AWS CLI identity,
# which needs IAM rights (an administrator); nothing is written to disk.
set -euo pipefail

bucket=${1:?usage: $0 BUCKET-NAME (without s3://)}
case $bucket in
YOUR-BUCKET | s3://*) echo "give your bucket's name, e.g. $0 my-bucket" >&2; exit 2 ;;
esac
account=$(aws sts get-caller-identity --query Account --output text)
node=transformer-wmt-node
head=transformer-wmt-head

trust='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}'
s3_policy=$(cat <<JSON
{"Version":"2012-10-17","Statement":[
 {"Effect":"Allow","Action":["s3:ListBucket","s3:GetBucketLocation"],"Resource":"arn:aws:s3:::$bucket"},
 {"Effect":"Allow","Action":["s3:GetObject","s3:PutObject","s3:DeleteObject","s3:AbortMultipartUpload",
   "s3:ListMultipartUploadParts"],"Resource":"arn:aws:s3:::$bucket/*"}]}
JSON
)
pass_node=$(cat <<JSON
{"Version":"2012-10-17","Statement":[
 {"Effect":"Allow","Action":"iam:PassRole","Resource":"arn:aws:iam::$account:role/$node"}]}
JSON
)

make_profile() { # name
    aws iam get-role --role-name "$1" >/dev/null 2>&1 ||
        aws iam create-role --role-name "$1" --assume-role-policy-document "$trust" >/dev/null
    aws iam put-role-policy --role-name "$1" --policy-name s3-bucket --policy-document "$s3_policy"
    aws iam get-instance-profile --instance-profile-name "$1" >/dev/null 2>&1 ||
        aws iam create-instance-profile --instance-profile-name "$1" >/dev/null
    aws iam get-instance-profile --instance-profile-name "$1" --query 'InstanceProfile.Roles[].RoleName' \
        --output text | grep -qw "$1" ||
        aws iam add-role-to-instance-profile --instance-profile-name "$1" --role-name "$1"
    echo "instance profile $1: S3 on $bucket"
}

make_profile "$node"
make_profile "$head"
aws iam attach-role-policy --role-name "$head" --policy-arn arn:aws:iam::aws:policy/AmazonEC2FullAccess
aws iam put-role-policy --role-name "$head" --policy-name pass-node-role --policy-document "$pass_node"
echo "instance profile $head: + EC2 + iam:PassRole on $node"
