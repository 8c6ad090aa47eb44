#!/usr/bin/env bash
# Measures wharf against the bars in DESIGN §6, side by side on this machine
# in one run, and prints each bar with its measured ratio.
#
#   benches/compare.sh [--quick] [--keep] [--out DIR]
#
# It starts, all on 127.0.0.1 and under one temp dir:
#   - Debian's docker-registry (distribution 2.8) as the upstream, seeded with
#     synthetic images through the push API (by the pullstorm harness), with
#     its access log on, to count upstream GETs;
#   - wharf (target/release/wharf) in front of it;
#   - docker-registry in proxy mode (`proxy: remoteurl:`) in front of it;
#   - nginx serving the same blob files with sendfile.
# Workloads: wrk for blob-hit throughput (4 connections) and tag-manifest
# requests/s (32 connections); the pullstorm harness for the cold stampede,
# warm storm, single cold pulls and wharf's memory.
#
# --quick: smaller blobs, fewer nodes, shorter wrk runs (about 1–2 minutes).
# --keep: keep the temp dir (logs, JSON reports). --out DIR: copy reports there.
# WHARF_BIN=… PULLSTORM_BIN=…: measure these builds instead of building here.
# Every process started here is stopped by PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

QUICK=0 KEEP=0 OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --keep) KEEP=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

if [ "$QUICK" = 1 ]; then
  BIG=64MiB STORM_NODES=10 HIT=16MiB WRK_DUR=4s REPS=1 SINGLES=1
else
  BIG=512MiB STORM_NODES=50 HIT=64MiB WRK_DUR=10s REPS=2 SINGLES=2
fi

log() { printf '\n== %s\n' "$*" >&2; }

# --- programs -------------------------------------------------------------
need=()
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
command -v jq >/dev/null || need+=(jq)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  log "installing ${need[*]}"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

W=$(mktemp -d /tmp/wharf-compare.XXXXXX)
chmod 755 "$W"
PIDS=()
cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ -n "$OUT" ]; then mkdir -p "$OUT"; cp "$W"/*.json "$W"/*.txt "$OUT"/ 2>/dev/null || true; fi
  if [ "$KEEP" = 1 ]; then echo "kept $W" >&2; else rm -rf "$W"; fi
  exit $rc
}
trap cleanup EXIT INT TERM

if [ -n "${WHARF_BIN:-}" ] && [ -n "${PULLSTORM_BIN:-}" ]; then
  log "using WHARF_BIN=$WHARF_BIN PULLSTORM_BIN=$PULLSTORM_BIN (no build)"
  WHARF_SRC=$WHARF_BIN HARNESS=$PULLSTORM_BIN
else
  log "building (release)"
  cargo build --release --bin wharf >&2
  WHARF_SRC=target/release/wharf
  HARNESS=$(cargo bench --bench pullstorm --no-run 2>&1 | sed -n 's/.*Executable benches\/pullstorm.rs (\(.*\))/\1/p' | tail -1)
fi
[ -x "$HARNESS" ] || { echo "could not find the pullstorm bench executable" >&2; exit 1; }
# Copies, so a rebuild elsewhere during the run cannot change what is measured.
mkdir -p "$W/bin"
cp "$WHARF_SRC" "$W/bin/wharf"
cp "$HARNESS" "$W/bin/pullstorm"
WHARF="$W/bin/wharf" PS="$W/bin/pullstorm"

free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 30000))
    (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null || { echo "$p"; return; }
  done
}
wait_http() { # url what
  for _ in $(seq 1 200); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$2 did not come up at $1" >&2; return 1
}

# --- upstream ---------------------------------------------------------------
UPORT=$(free_port)
mkdir -p "$W/upstream"
cat > "$W/upstream/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $W/upstream/data
  redirect:
    disable: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:$UPORT
  secret: wharf-compare
health:
  storagedriver:
    enabled: false
EOF
docker-registry serve "$W/upstream/config.yml" > "$W/upstream/access.log" 2> "$W/upstream/registry.log" &
PIDS+=($!)
UP="http://127.0.0.1:$UPORT"
wait_http "$UP/v2/" "upstream docker-registry"

log "seeding the upstream (bench/small 3×1MiB, bench/hit 1×$HIT, bench/big 1×$BIG, $SINGLES × bench/single 1×$BIG)"
mkdir -p "$W/nginx/html/blobs"
"$PS" --registry "$UP" --seed-only --image bench/small:1 --seed-layers 3 --seed-layer-size 1MiB > "$W/seed.txt"
"$PS" --registry "$UP" --seed-only --image bench/hit:1 --seed-layers 1 --seed-layer-size "$HIT" --blob-dir "$W/nginx/html/blobs" >> "$W/seed.txt"
"$PS" --registry "$UP" --seed-only --image bench/big:1 --seed-layers 1 --seed-layer-size "$BIG" >> "$W/seed.txt"
for i in $(seq 1 "$SINGLES"); do
  "$PS" --registry "$UP" --seed-only --image "bench/single$i:1" --seed-layers 1 --seed-layer-size "$BIG" >> "$W/seed.txt"
done
layer_of() { sed -n "s|^seeded $1 .*layers=\(sha256:[0-9a-f]*\):.*|\1|p" "$W/seed.txt"; }
HIT_DIGEST=$(layer_of bench/hit:1)
BIG_DIGEST=$(layer_of bench/big:1)
HIT_HEX=${HIT_DIGEST#sha256:}
chmod -R a+rX "$W/nginx"

# --- wharf ----------------------------------------------------------------
WPORT=$(free_port)
admin=()
"$WHARF" serve --help | grep -q -- --admin-listen && admin=(--admin-listen "127.0.0.1:$(free_port)")
"$WHARF" serve --listen "127.0.0.1:$WPORT" "${admin[@]}" --data-dir "$W/wharf-data" \
  --upstream "docker.io=$UP" > "$W/wharf.out" 2> "$W/wharf.log" &
WPID=$!
PIDS+=($WPID)
for _ in $(seq 1 100); do grep -q "wharf listening on" "$W/wharf.out" && break; sleep 0.1; done
grep -q "wharf listening on" "$W/wharf.out" || { echo "wharf did not start:" >&2; tail -20 "$W/wharf.log" >&2; exit 1; }
WH="http://127.0.0.1:$WPORT"

# --- distribution in proxy mode (after the upstream is up: it panics otherwise) ---
DPORT=$(free_port)
mkdir -p "$W/dproxy"
cat > "$W/dproxy/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $W/dproxy/data
  redirect:
    disable: true
http:
  addr: 127.0.0.1:$DPORT
  secret: wharf-compare-proxy
health:
  storagedriver:
    enabled: false
proxy:
  remoteurl: $UP
EOF
docker-registry serve "$W/dproxy/config.yml" > "$W/dproxy/out.log" 2> "$W/dproxy/registry.log" &
PIDS+=($!)
DP="http://127.0.0.1:$DPORT"
wait_http "$DP/v2/" "distribution proxy"

# --- nginx with sendfile ------------------------------------------------------
NPORT=$(free_port)
mkdir -p "$W/nginx/logs" "$W/nginx/tmp"
cat > "$W/nginx/nginx.conf" <<EOF
daemon off;
worker_processes auto;
pid $W/nginx/nginx.pid;
error_log $W/nginx/logs/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  default_type application/octet-stream;
  client_body_temp_path $W/nginx/tmp/body;
  proxy_temp_path $W/nginx/tmp/proxy;
  fastcgi_temp_path $W/nginx/tmp/fastcgi;
  uwsgi_temp_path $W/nginx/tmp/uwsgi;
  scgi_temp_path $W/nginx/tmp/scgi;
  server {
    listen 127.0.0.1:$NPORT;
    root $W/nginx/html;
  }
}
EOF
"$NGINX" -p "$W/nginx" -c "$W/nginx/nginx.conf" -e "$W/nginx/logs/error.log" &
PIDS+=($!)
NG="http://127.0.0.1:$NPORT"
wait_http "$NG/blobs/$HIT_HEX" "nginx"

# --- wrk helpers ----------------------------------------------------------------
cat > "$W/stats.lua" <<'EOF'
done = function(summary, latency, requests)
  io.write(string.format(
    "WRK requests=%d bytes=%d duration_us=%d non2xx=%d errors=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d\n",
    summary.requests, summary.bytes, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
EOF
ACCEPT="Accept: application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json"
wrk_run() { # label conns url [header]
  local label=$1 conns=$2 url=$3; shift 3
  local hdr=()
  [ $# -gt 0 ] && hdr=(-H "$1")
  wrk -t2 -c"$conns" -d"$WRK_DUR" --timeout 10s -s "$W/stats.lua" "${hdr[@]}" "$url" > "$W/wrk-$label.txt" 2>&1
  grep '^WRK ' "$W/wrk-$label.txt" | sed "s/^WRK /label=$label /"
}
field() { sed -n "s/.* $2=\([0-9]*\).*/\1/p" <<<"$1"; }
best() { # best value of a field across lines on stdin
  awk -v f="$1" '{ for (i = 1; i <= NF; i++) { split($i, kv, "="); if (kv[1] == f && kv[2] + 0 > m) m = kv[2] + 0 } } END { print m + 0 }'
}
fmt() { awk -v x="$1" 'BEGIN { printf "%.2f", x }'; }

# --- 1. blob-hit throughput: wharf vs nginx sendfile -------------------------------
log "blob-hit throughput: $HIT file, 4 connections, ${WRK_DUR} × $REPS each, alternating"
curl -fsS -o "$W/hit.check" "$WH/v2/bench/hit/blobs/$HIT_DIGEST"   # fill the cache
echo "$HIT_HEX  $W/hit.check" | sha256sum -c --quiet - && rm -f "$W/hit.check"
: > "$W/blobhit.txt"
for r in $(seq 1 "$REPS"); do
  for who in nginx wharf; do
    url="$NG/blobs/$HIT_HEX"; [ $who = wharf ] && url="$WH/v2/bench/hit/blobs/$HIT_DIGEST"
    line=$(wrk_run "blob-$who-$r" 4 "$url")
    bps=$(awk -v b="$(field "$line" bytes)" -v d="$(field "$line" duration_us)" 'BEGIN { printf "%.0f", b / (d / 1e6) }')
    echo "$who bps=$bps $line" | tee -a "$W/blobhit.txt" >&2
  done
done
NG_BPS=$(grep '^nginx ' "$W/blobhit.txt" | best bps)
WH_BPS=$(grep '^wharf ' "$W/blobhit.txt" | best bps)

# --- 2. tag manifests: wharf vs distribution proxy ---------------------------------
log "tag-manifest hits: 32 connections, ${WRK_DUR} × $REPS each, alternating"
curl -fsS -o /dev/null -H "$ACCEPT" "$WH/v2/bench/small/manifests/1"
curl -fsS -o /dev/null -H "$ACCEPT" "$DP/v2/bench/small/manifests/1"
"$PS" --registry "$DP" --image bench/small:1 --quiet > /dev/null  # the proxy caches the blobs too
: > "$W/manifest.txt"
for r in $(seq 1 "$REPS"); do
  for who in distribution wharf; do
    base=$DP; [ $who = wharf ] && base=$WH
    line=$(wrk_run "manifest-$who-$r" 32 "$base/v2/bench/small/manifests/1" "$ACCEPT")
    rps=$(awk -v n="$(field "$line" requests)" -v d="$(field "$line" duration_us)" 'BEGIN { printf "%.0f", n / (d / 1e6) }')
    echo "$who rps=$rps $line" | tee -a "$W/manifest.txt" >&2
  done
done
DP_RPS=$(grep '^distribution ' "$W/manifest.txt" | best rps)
WH_RPS=$(grep '^wharf ' "$W/manifest.txt" | best rps)
# p99 of wharf's best run (by requests/s).
WH_P99_US=$(grep '^wharf ' "$W/manifest.txt" | sort -t= -k2 -n -r | head -1 | sed -n 's/.* p99_us=\([0-9]*\).*/\1/p')
MANIFEST_NON2XX=$(grep -o 'non2xx=[0-9]*' "$W/manifest.txt" | cut -d= -f2 | awk '{ s += $1 } END { print s + 0 }')

# --- 3. cold stampede and warm storm through wharf ---------------------------------
count_up_gets() { grep -c "\"GET /v2/bench/big/blobs/$BIG_DIGEST" "$W/upstream/access.log" || true; }
log "cold stampede: $STORM_NODES nodes pull bench/big:1 ($BIG layer) through a cold wharf"
echo 5 > "/proc/$WPID/clear_refs" 2>/dev/null || true   # reset VmHWM: count only the storms
before=$(count_up_gets)
"$PS" --registry "$WH" --image bench/big:1 --nodes "$STORM_NODES" --concurrency-per-node 1 \
  --watch-pid "$WPID" --label cold-storm --json "$W/cold-storm.json" > "$W/cold-storm.txt" || true
cat "$W/cold-storm.txt" >&2
UP_GETS=$(( $(count_up_gets) - before ))
log "warm storm: the same $STORM_NODES pulls, now cached"
"$PS" --registry "$WH" --image bench/big:1 --nodes "$STORM_NODES" --concurrency-per-node 1 \
  --watch-pid "$WPID" --label warm-storm --json "$W/warm-storm.json" > "$W/warm-storm.txt" || true
cat "$W/warm-storm.txt" >&2
COLD_WALL=$(jq .wall_s "$W/cold-storm.json")
WARM_WALL=$(jq .wall_s "$W/warm-storm.json")
STORM_ERRORS=$(( $(jq '[.errors[]] | add // 0' "$W/cold-storm.json") + $(jq '[.errors[]] | add // 0' "$W/warm-storm.json") ))
RSS=$(jq -s 'map([.rss_hwm_mib, .rss_peak_sampled_mib] | max) | max' "$W/cold-storm.json" "$W/warm-storm.json")

# --- 4. single cold pull: wharf vs straight from upstream ---------------------------
log "single cold pull of a $BIG layer: upstream direct, then through wharf (cold), × $SINGLES"
: > "$W/single.txt"
for i in $(seq 1 "$SINGLES"); do
  "$PS" --registry "$UP" --image "bench/single$i:1" --quiet --label "direct-$i" --json "$W/single-direct-$i.json" > /dev/null || true
  "$PS" --registry "$WH" --image "bench/single$i:1" --quiet --label "wharf-cold-$i" --json "$W/single-wharf-$i.json" > /dev/null || true
  d=$(jq .bytes_per_s "$W/single-direct-$i.json"); c=$(jq .bytes_per_s "$W/single-wharf-$i.json")
  echo "direct bps=$(fmt "$d") wharf_cold bps=$(fmt "$c")" | tee -a "$W/single.txt" >&2
done
DIRECT_BPS=$(jq -s 'map(.bytes_per_s) | max' "$W"/single-direct-*.json)
COLD_BPS=$(jq -s 'map(.bytes_per_s) | max' "$W"/single-wharf-*.json)
SINGLE_ERRORS=$(jq -s 'map([.errors[]] | add // 0) | add' "$W"/single-*.json)

# --- report ---------------------------------------------------------------------------
mib() { awk -v x="$1" 'BEGIN { printf "%.0f MiB/s", x / 1048576 }'; }
verdict() { if awk "BEGIN { exit !($1) }"; then echo "met"; else echo "NOT MET"; fi; }
R1=$(awk -v a="$WH_BPS" -v b="$NG_BPS" 'BEGIN { print (b > 0 ? a / b : 0) }')
R2=$(awk -v a="$WH_RPS" -v b="$DP_RPS" 'BEGIN { print (b > 0 ? a / b : 0) }')
P99=$(awk -v u="$WH_P99_US" 'BEGIN { print u / 1000 }')
R3=$(awk -v a="$COLD_WALL" -v b="$WARM_WALL" 'BEGIN { print (b > 0 ? a / b : 0) }')
R4=$(awk -v a="$COLD_BPS" -v b="$DIRECT_BPS" 'BEGIN { print (b > 0 ? a / b : 0) }')
{
  echo
  echo "wharf vs DESIGN §6 bars ($( [ $QUICK = 1 ] && echo quick || echo full ) run, $(date -u +%FT%TZ), $(nproc) cores; best of $REPS for wrk runs)"
  printf '%-46s %-44s %-10s %s\n' "bar" "measured" "target" "result"
  printf '%-46s %-44s %-10s %s\n' "blob-hit throughput, $HIT, 4 conns" \
    "wharf $(mib "$WH_BPS") / nginx $(mib "$NG_BPS") = $(fmt "$R1")×" "≥ 0.9×" "$(verdict "$R1 >= 0.9")"
  printf '%-46s %-44s %-10s %s\n' "tag-manifest hits req/s, 32 conns" \
    "wharf $WH_RPS / distribution $DP_RPS = $(fmt "$R2")×" "≥ 20×" "$(verdict "$R2 >= 20")"
  printf '%-46s %-44s %-10s %s\n' "tag-manifest hit p99 (wharf), 32 conns" "$(fmt "$P99") ms" "< 5 ms" "$(verdict "$P99 < 5")"
  printf '%-46s %-44s %-10s %s\n' "cold stampede: upstream GETs of the layer" "$UP_GETS ($STORM_NODES clients × $BIG)" "= 1" "$(verdict "$UP_GETS == 1")"
  printf '%-46s %-44s %-10s %s\n' "cold storm wall / warm storm wall" \
    "$(fmt "$COLD_WALL") s / $(fmt "$WARM_WALL") s = $(fmt "$R3")×" "≤ 1.5×" "$(verdict "$R3 <= 1.5 && $R3 > 0")"
  printf '%-46s %-44s %-10s %s\n' "cold single pull: wharf / upstream direct" \
    "$(mib "$COLD_BPS") / $(mib "$DIRECT_BPS") = $(fmt "$R4")×" "≥ 0.8×" "$(verdict "$R4 >= 0.8")"
  printf '%-46s %-44s %-10s %s\n' "wharf peak RSS, $STORM_NODES × $BIG cold + warm" "$(fmt "$RSS") MiB (VmHWM)" "< 100 MiB" "$(verdict "$RSS < 100")"
  echo "errors: manifest non-2xx $MANIFEST_NON2XX, storm pulls $STORM_ERRORS, single pulls $SINGLE_ERRORS"
} | tee "$W/summary.txt"
