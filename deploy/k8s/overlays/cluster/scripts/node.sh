#!/bin/sh
# Start one Redis Cluster node (StatefulSet "redis-cluster", redis:7.2-bookworm image).
#
# /data/nodes.conf (on the pod's volume) keeps the node's identity and its view of the
# cluster across restarts. Pod IPs change when pods are rescheduled, so before starting,
# every address in it is refreshed from the DNS name recorded beside it (Redis 7 writes
# `ip:port@cport,hostname` when cluster-announce-hostname is set): this node's own from
# POD_IP, the others through the headless Service. A name that does not resolve yet
# keeps its old address; the cluster bus gossip corrects it once that pod is back.
set -eu

SELF="${HOSTNAME}.redis-cluster"
CONF=/data/nodes.conf

if [ -s "$CONF" ]; then
  awk -v self_ip="$POD_IP" '
    /^vars/ { print; next }
    {
      n = split($2, part, ",")          # part[1] = ip:port@cport, part[2] = hostname
      rest = substr($2, length(part[1]) + 1)
      ports = part[1]; sub(/^.*:/, "", ports)   # port@cport (IPv6 safe: last colon)
      addr = ""
      if ($3 ~ /myself/) {
        addr = self_ip
      } else if (n >= 2 && part[2] != "") {
        cmd = "getent hosts " part[2]
        if ((cmd | getline line) > 0) { split(line, f, " "); addr = f[1] }
        close(cmd)
      }
      if (addr != "") {
        $2 = addr ":" ports rest
      }
      print
    }' "$CONF" > "$CONF.new"
  mv "$CONF.new" "$CONF"

  # A master that restarts comes back empty (no persistence). Give the cluster time to
  # promote its replica first (2 x cluster-node-timeout): it then rejoins as a replica
  # of the new master instead of handing its replica an empty dataset.
  if grep -q "myself,master" "$CONF"; then
    echo "this node was a master: waiting 12 s for its replica to take over"
    sleep 12
  fi
fi

exec redis-server --port 6379 --protected-mode no --dir /data \
  --cluster-enabled yes --cluster-config-file "$CONF" --cluster-node-timeout 5000 \
  --cluster-announce-hostname "$SELF" --cluster-preferred-endpoint-type hostname \
  --cluster-require-full-coverage no \
  --save "" --appendonly no \
  --maxmemory 800mb --maxmemory-policy noeviction
