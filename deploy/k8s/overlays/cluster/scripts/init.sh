#!/bin/sh
# Job redis-cluster-init: once all six nodes answer, create the cluster (3 masters, one
# replica each) unless it exists already. Safe to run again: it never touches a cluster
# that has slots assigned. redis-cli 7 resolves the DNS names itself.
set -eu

NODES=6
SERVICE=redis-cluster
hosts=""
i=0
while [ "$i" -lt "$NODES" ]; do
  host="${SERVICE}-${i}.${SERVICE}"
  until [ "$(timeout 3 redis-cli -h "$host" -p 6379 ping 2>/dev/null)" = "PONG" ]; do
    echo "waiting for $host"
    sleep 2
  done
  hosts="$hosts $host:6379"
  i=$((i + 1))
done

first="${SERVICE}-0.${SERVICE}"
for host in $hosts; do
  assigned=$(redis-cli -h "${host%:*}" -p 6379 cluster info | tr -d '\r' \
    | awk -F: '$1 == "cluster_slots_assigned" { print $2 }')
  if [ "${assigned:-0}" != 0 ]; then
    echo "$host already has $assigned slots assigned: the cluster exists, nothing to do"
    redis-cli --cluster check "$host" || true
    exit 0
  fi
done

echo "creating the cluster:$hosts"
# shellcheck disable=SC2086  # one argument per node
redis-cli --cluster create $hosts --cluster-replicas 1 --cluster-yes

# Wait until every node agrees the cluster is up.
for host in $hosts; do
  until redis-cli -h "${host%:*}" -p 6379 cluster info | tr -d '\r' | grep -qx 'cluster_state:ok'; do
    echo "waiting for $host to see cluster_state:ok"
    sleep 2
  done
done
redis-cli --cluster check "$first:6379"
