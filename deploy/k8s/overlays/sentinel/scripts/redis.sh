#!/bin/sh
# Start this pod's Redis as the master, or as a replica of the master the Sentinels name.
set -eu
. /scripts/common.sh

master=$(ask_sentinels)
if [ "$master" = "$SELF" ]; then
  # The Sentinels still take this pod for the master, but it restarted with an empty
  # dataset (no persistence): serving as master now would make the replicas drop their
  # copy. Wait for the failover (down-after-milliseconds 5 s) and follow the new master.
  echo "sentinels still name this pod master; waiting for their failover"
  tries=0
  while [ "$master" = "$SELF" ] && [ "$tries" -lt 30 ]; do
    sleep 2
    master=$(ask_sentinels)
    tries=$((tries + 1))
  done
fi
if [ -z "$master" ]; then
  # Nobody knows a master: pod 0 starts as master, the others replicate it.
  if [ "$ORDINAL" = 0 ]; then master="$SELF"; else master="redis-0.${HEADLESS}"; fi
fi

set -- redis-server --port 6379 --protected-mode no --dir /data \
  --save "" --appendonly no \
  --maxmemory 800mb --maxmemory-policy noeviction \
  --replica-announce-ip "$SELF"
if [ "$master" = "$SELF" ]; then
  echo "starting as master ($SELF)"
else
  echo "starting as a replica of $master"
  set -- "$@" --replicaof "$master" 6379
fi
exec "$@"
