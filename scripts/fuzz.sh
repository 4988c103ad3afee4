#!/usr/bin/env bash
# Fuzzes the parsers that take outside input (fuzz/fuzz_targets: manifests, both ends of
# the agent link, quantities and durations, cron schedules) with cargo fuzz (libFuzzer,
# AddressSanitizer) and prints each target's execution count.
#
# Usage: scripts/fuzz.sh [--secs N | --runs N] [TARGET...]
#   --secs N   each target for N seconds (default 60)
#   --runs N   each target for N executions (10000000 for the full run)
#
# Needs cargo-fuzz (installed from crates.io when missing). A crash, a
# timeout (10 s for one input), or an input that makes the parser use more than 512 MiB
# stops the run: the input is kept under fuzz/artifacts/TARGET/ and must become a
# regression test next to the parser it broke. Corpora grow under fuzz/corpus/ (not
# committed), seeded from fuzz/seeds/.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=60
runs=
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --secs) secs="${2:?--secs needs a number}"; shift 2 ;;
        --runs) runs="${2:?--runs needs a number}"; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        -*) echo "usage: scripts/fuzz.sh [--secs N | --runs N] [TARGET...] (unknown option: $1)" >&2; exit 64 ;;
        *) targets+=("$1"); shift ;;
    esac
done

# cargo fuzz passes rustc unstable flags (-Zsanitizer=address and others). The
# machines that build Bramble have one toolchain, a stable one, and no other can be
# fetched: RUSTC_BOOTSTRAP lets that one accept them. Only this script's builds see it,
# in their own target directory (fuzz/target); the product never does.
export RUSTC_BOOTSTRAP=1
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(sed -n 's/^name = "\([a-z_]*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^bramble-fuzz$')
fi

# One build for all targets: the instrumented bramble-api and its dependencies.
cargo fuzz build --fuzz-dir fuzz -O --debug-assertions "${targets[@]:0:1}" >/dev/null
for t in "${targets[@]:1}"; do
    cargo fuzz build --fuzz-dir fuzz -O --debug-assertions "$t" >/dev/null
done

limit=(-max_total_time="$secs")
[ -n "$runs" ] && limit=(-runs="$runs")
printf '\n%-18s %14s %10s %12s %s\n' target executions seconds "per second" corpus
failed=()
for t in "${targets[@]}"; do
    corpus="fuzz/corpus/$t"
    mkdir -p "$corpus" "fuzz/artifacts/$t"
    log="$(mktemp)"
    # 64 KiB inputs: manifests and frames larger than any seed, without making each
    # run slow; -rss_limit_mb and -malloc_limit_mb turn an outsized allocation into a
    # failure instead of a swapping machine.
    if cargo fuzz run --fuzz-dir fuzz -O --debug-assertions "$t" "$corpus" "fuzz/seeds/$t" -- \
        "${limit[@]}" -max_len=65536 -timeout=10 -rss_limit_mb=512 -malloc_limit_mb=512 \
        -print_final_stats=1 >"$log" 2>&1; then
        status=ok
    else
        status=FAILED
        failed+=("$t")
    fi
    done_line="$(grep -E '^Done [0-9]+ runs in [0-9]+ second' "$log" | tail -n 1 || true)"
    n="$(echo "$done_line" | awk '{print $2}')"
    s="$(echo "$done_line" | awk '{print $5}')"
    if [ -z "$n" ]; then
        n="$(grep -E '^stat::number_of_executed_units:' "$log" | awk '{print $2}' | tail -n 1)"
        s="$secs"
    fi
    rate=$(awk -v n="${n:-0}" -v s="${s:-1}" 'BEGIN { if (s > 0) printf "%.0f", n / s; else print n }')
    printf '%-18s %14s %10s %12s %s %s\n' "$t" "${n:-?}" "${s:-?}" "$rate" "$(find "$corpus" -type f | wc -l) inputs" "$status"
    if [ "$status" = FAILED ]; then
        echo "--- $t: the end of libFuzzer's output:" >&2
        tail -n 40 "$log" >&2
        echo "--- inputs kept in fuzz/artifacts/$t/:" >&2
        ls -l "fuzz/artifacts/$t" >&2
    fi
    rm -f "$log"
done
echo
if [ -n "$runs" ]; then
    echo "rerun: scripts/fuzz.sh --runs $runs ${targets[*]}"
else
    echo "rerun: scripts/fuzz.sh --secs $secs ${targets[*]}"
fi
if [ ${#failed[@]} -gt 0 ]; then
    echo "error: fuzzing found inputs that break ${failed[*]} (see above)" >&2
    exit 1
fi
