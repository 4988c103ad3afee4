#!/usr/bin/env bash
# The Arm test (DESIGN.md "Tests" 5): cross-builds the agent and controller for aarch64 and
# armv7, runs them under qemu-user, and joins the aarch64 agent to a host controller that
# then runs a Service on it in the host's Docker. Also measures what the Pi budgets care
# about: stripped agent size, and the agent's resident memory idle and with 10 tasks.
#
# Usage: scripts/test-arm.sh        (needs Docker, and apt-get for qemu-user and gcc cross)
#
# qemu-user runs the ARM binaries explicitly (`qemu-aarch64 -L /usr/aarch64-linux-gnu BIN`),
# so no binfmt_misc registration (qemu-user-binfmt) is needed or changed on the machine.
# The agent talks to the host's Docker Engine through its socket like on a Pi; the
# containers it starts are the host's (x86_64) test image, which is what a Pi would do
# with an arm64 image.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
die() { echo "error: $*" >&2; exit 1; }

node=arm-test
workload=arm-test-svc
admin_token="arm-test-admin-$$-$RANDOM"
join_token="arm-test-join-$$-$RANDOM"
tmp="$(mktemp -d)"
controller_pid=
agent_pid=
idle_pid=

cleanup() {
    local rc=$?
    set +e
    # Only the processes this script started, by their ids.
    [ -n "$idle_pid" ] && kill "$idle_pid" 2>/dev/null
    [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null
    [ -n "$controller_pid" ] && kill "$controller_pid" 2>/dev/null && wait "$controller_pid" 2>/dev/null
    # The agent leaves containers running on shutdown (by design), so remove this node's.
    docker ps -aq --filter "label=bramble.node=$node" 2>/dev/null | xargs -r docker rm -f >/dev/null 2>&1
    if [ "$rc" -ne 0 ]; then
        for f in controller agent; do
            [ -s "$tmp/$f.log" ] && { echo "--- last lines of the $f log:" >&2; tail -n 30 "$tmp/$f.log" >&2; }
        done
        echo "FAILED: scripts/test-arm.sh (exit $rc)" >&2
    fi
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits up to $1 seconds for the command that follows to succeed.
wait_for() {
    local secs="$1"; shift
    local deadline=$((SECONDS + secs))
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.5
    done
}

# Resident memory of a process in KiB (for qemu-user this includes the emulator itself).
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

step "tools"
sudo_=()
[ "$(id -u)" -eq 0 ] || sudo_=(sudo)
missing=()
for p in qemu-user curl jq; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    "${sudo_[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi
docker info >/dev/null 2>&1 || die "the Docker Engine is not reachable (docker info failed)"

cross_dir="${BRAMBLE_CROSS_DIR:-target}"
step "cross-build (release)"
# The agents in release (their size and memory are the Pi budgets); the controllers only
# have to build, link and print their version under qemu, so the dev profile does.
# scripts/test.sh builds them alongside the host's tests (BRAMBLE_CROSS_BUILT=1).
if [ "${BRAMBLE_CROSS_BUILT:-0}" = 1 ]; then
    echo "built already, in $cross_dir"
else
    scripts/cross-build.sh --release --controller-dev
fi

a64_agent="$cross_dir/aarch64-unknown-linux-gnu/release/bramble-agent"
arm_agent="$cross_dir/armv7-unknown-linux-gnueabihf/release/bramble-agent"
run_a64() { qemu-aarch64 -L /usr/aarch64-linux-gnu "$@"; }
run_arm() { qemu-arm -L /usr/arm-linux-gnueabihf "$@"; }

step "--version under qemu-user"
for t in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
    for b in bramble-agent bramble-controller; do
        p=release
        [ "$b" = bramble-controller ] && p=debug
        if [ "$t" = aarch64-unknown-linux-gnu ]; then
            out="$(run_a64 "$cross_dir/$t/$p/$b" --version)" || die "$t $b --version failed under qemu"
        else
            out="$(run_arm "$cross_dir/$t/$p/$b" --version)" || die "$t $b --version failed under qemu"
        fi
        [[ "$out" == "$b "* ]] || die "$t $b --version printed \"$out\""
        printf '%-32s %s\n' "$t" "$out"
    done
done

step "the cron gate: static, runs under qemu-user with no libraries at all"
for t in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
    gate="$cross_dir/$t/release/bramble-gate"
    q=qemu-arm
    [ "$t" = aarch64-unknown-linux-gnu ] && q=qemu-aarch64
    # No -L: a dynamically linked gate would not even start, as in a FROM scratch image.
    out="$("$q" "$gate" 0 -- /nonexistent 2>&1)" && rc=0 || rc=$?
    [ "$rc" = 127 ] && [[ "$out" == *'cannot run "/nonexistent"'* ]] \
        || die "$t bramble-gate under $q: exit $rc, printed \"$out\""
    printf '%-32s bramble-gate runs static (%s bytes)\n' "$t" "$(stat -c %s "$gate")"
done

step "host controller and test image"
# The whole workspace, as scripts/test.sh builds it: a lone `-p bramble-controller`
# unifies features differently and would rebuild much of the dependency tree.
# scripts/test.sh has built it already and may have freed the rest of target/debug
# (BRAMBLE_HOST_BUILT=1): its binaries are kept, and rebuilding them would cost minutes.
if [ "${BRAMBLE_HOST_BUILT:-0}" != 1 ] || [ ! -x target/debug/bramble-controller ]; then
    cargo build --locked --workspace --bins
fi
scripts/build-testimg.sh

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
api="https://127.0.0.1:$port"
# Tokens through the environment, as the README says: argv is readable by every user.
NO_COLOR=1 BRAMBLE_ADMIN_TOKEN="$admin_token" BRAMBLE_JOIN_TOKEN="$join_token" \
    target/debug/bramble-controller --no-local-agent --no-mdns --listen "127.0.0.1:$port" \
    --data-dir "$tmp/controller" >"$tmp/controller.log" 2>&1 &
controller_pid=$!

# The controller serves TLS with its own CA (DATA_DIR/ca.crt), which curl trusts here.
get() { curl -fsS --cacert "$tmp/controller/ca.crt" -H "Authorization: Bearer $admin_token" "$api$1"; }
wait_for 30 get /v1/version >/dev/null 2>&1 || die "the controller did not answer on $api within 30 s"

step "aarch64 agent under qemu-aarch64"
# The whole join token (with the CA's fingerprint the agent checks) from the data dir.
NO_COLOR=1 BRAMBLE_LOG=info qemu-aarch64 -L /usr/aarch64-linux-gnu "$a64_agent" \
    --controller "$api" --join-token-file "$tmp/controller/join-token" --node-name "$node" \
    --data-dir "$tmp/agent" >"$tmp/agent.log" 2>&1 &
agent_pid=$!

node_is_ready_arm64() {
    [ "$(get /v1/nodes 2>/dev/null | jq -r --arg n "$node" '.[] | select(.info.name == $n) | "\(.status) \(.info.arch)"')" = "Ready arm64" ]
}
wait_for 60 node_is_ready_arm64 || die "node $node did not become Ready with arch arm64 within 60 s (GET /v1/nodes: $(get /v1/nodes 2>&1))"
echo "node $node is Ready, arch arm64"
# Let start-up allocations settle before calling the figure idle.
sleep 3
idle_kib="$(rss_kib "$agent_pid")"

running() { docker ps -q --filter "label=bramble.node=$node" --filter status=running | wc -l; }
# True once at least $1 of the node's containers are running.
running_at_least() { [ "$(running)" -ge "$1" ]; }
# Applies the Service with $1 replicas.
apply_service() {
    local yaml body
    yaml="$(printf 'apiVersion: bramble/v1\nkind: Service\nmetadata:\n  name: %s\nspec:\n  image: bramble-testimg:latest\n  args: ["sleep", "1000"]\n  resources: {cpu: 10m, memory: 8Mi}\n  replicas: %d\n' "$workload" "$1")"
    body="$(jq -n --arg c "$yaml" '{sources: [{name: "arm-test.yaml", content: $c}]}')"
    curl -fsS --cacert "$tmp/controller/ca.crt" -H "Authorization: Bearer $admin_token" -H 'Content-Type: application/json' \
        -d "$body" "$api/v1/apply" >"$tmp/apply.json" \
        || die "POST /v1/apply failed: $(cat "$tmp/apply.json" 2>/dev/null)"
}

step "a Service on the arm64 node"
apply_service 1
wait_for 60 running_at_least 1 \
    || die "no running container with label bramble.node=$node within 60 s (tasks: $(get "/v1/tasks?node=$node" 2>&1))"
docker ps --filter "label=bramble.node=$node" --format '{{.Names}}  {{.Image}}  {{.Status}}'

step "10 tasks"
apply_service 10
wait_for 120 running_at_least 10 \
    || die "only $(running) of 10 containers running on $node after 120 s"
sleep 5
busy_kib="$(rss_kib "$agent_pid")"

# qemu-user's own share of those figures: the RSS of a do-nothing aarch64 program (glibc
# loaded, then pause()) under the same emulator. The difference estimates what the agent
# itself would use on a Pi (it still counts the agent's larger translated-code cache).
printf '#include <unistd.h>\nint main(void) { pause(); return 0; }\n' >"$tmp/idle.c"
aarch64-linux-gnu-gcc -O2 -o "$tmp/idle" "$tmp/idle.c"
qemu-aarch64 -L /usr/aarch64-linux-gnu "$tmp/idle" &
idle_pid=$!
sleep 1
base_kib="$(rss_kib "$idle_pid")"
kill "$idle_pid"; wait "$idle_pid" 2>/dev/null || true
idle_pid=

step "figures"
# Sizes of stripped copies (release builds are stripped by the profile already).
stripped_size() { "$1" -o "$tmp/stripped" "$2" && stat -c %s "$tmp/stripped"; }
a64_size="$(stripped_size aarch64-linux-gnu-strip "$a64_agent")"
arm_size="$(stripped_size arm-linux-gnueabihf-strip "$arm_agent")"
printf 'stripped agent, aarch64:                      %9d bytes (%.2f MiB)\n' "$a64_size" "$(awk "BEGIN { print $a64_size / 1048576 }")"
printf 'stripped agent, armv7:                        %9d bytes (%.2f MiB)\n' "$arm_size" "$(awk "BEGIN { print $arm_size / 1048576 }")"
printf 'agent RSS under qemu-aarch64, idle:           %9d KiB (%.1f MiB, qemu included)\n' "$idle_kib" "$(awk "BEGIN { print $idle_kib / 1024 }")"
printf 'agent RSS under qemu-aarch64, 10 tasks:       %9d KiB (%.1f MiB, qemu included)\n' "$busy_kib" "$(awk "BEGIN { print $busy_kib / 1024 }")"
printf 'qemu-aarch64 running a do-nothing program:    %9d KiB (%.1f MiB)\n' "$base_kib" "$(awk "BEGIN { print $base_kib / 1024 }")"
printf 'agent estimate without qemu, idle / 10 tasks: %9.1f / %.1f MiB (budget: 10 MiB)\n' \
    "$(awk "BEGIN { print ($idle_kib - $base_kib) / 1024 }")" "$(awk "BEGIN { print ($busy_kib - $base_kib) / 1024 }")"
echo
echo "scripts/test-arm.sh: passed"
