# Sourced by redis.sh and sentinel.sh (POSIX sh, redis:7.2-bookworm image).
# Pod names are stable (StatefulSet "redis", headless Service "redis-headless"); every
# Redis and Sentinel announces its DNS name, not its pod IP, so a rescheduled pod keeps
# its identity (Redis 7: `sentinel resolve-hostnames` / `announce-hostnames`).

MASTER_NAME=penaltyd            # the name in PENALTYD_REDIS_URL (.../penaltyd/0)
HEADLESS=redis-headless
REPLICAS=3
SELF="${HOSTNAME}.${HEADLESS}"
ORDINAL="${HOSTNAME##*-}"

# Print the current master's host as the Sentinels of the other pods know it, or nothing
# when none of them answers (a new StatefulSet, or every pod restarted).
ask_sentinels() {
  i=0
  while [ "$i" -lt "$REPLICAS" ]; do
    host="redis-${i}.${HEADLESS}"
    i=$((i + 1))
    [ "$host" = "$SELF" ] && continue  # our own Sentinel starts with us
    addr=$(timeout 3 redis-cli -h "$host" -p 26379 --raw \
      sentinel get-master-addr-by-name "$MASTER_NAME" 2>/dev/null | head -n 1) || addr=""
    case "$addr" in
      "" | *" "* | ERR* | IDONTKNOW*) ;;
      *) echo "$addr"; return 0 ;;
    esac
  done
  return 0
}
