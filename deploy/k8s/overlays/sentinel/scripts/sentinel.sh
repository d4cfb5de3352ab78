#!/bin/sh
# Start this pod's Sentinel, monitoring the current master (or redis-0 on a new set).
set -eu
. /scripts/common.sh

master=$(ask_sentinels)
[ -n "$master" ] || master="redis-0.${HEADLESS}"
# `sentinel monitor` refuses a name it cannot resolve; the headless Service publishes
# pods before they are ready, so this only waits for the pod to exist.
until getent hosts "$master" >/dev/null; do
  echo "waiting for $master to resolve"
  sleep 1
done

# Sentinel rewrites its own file (known replicas, epochs): it lives on an emptyDir.
conf=/sentinel/sentinel.conf
cat > "$conf" <<CONF
port 26379
protected-mode no
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip ${SELF}
sentinel monitor ${MASTER_NAME} ${master} 6379 2
sentinel down-after-milliseconds ${MASTER_NAME} 5000
sentinel failover-timeout ${MASTER_NAME} 60000
sentinel parallel-syncs ${MASTER_NAME} 1
CONF
exec redis-server "$conf" --sentinel
