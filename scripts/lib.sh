# shellcheck shell=bash
# Shared helpers for podflare build scripts. Source it:
#   . "$(dirname "$0")/lib.sh"
# Stable interface (the kernel and rootfs builders both rely on it):
#   step NAME HINT CMD...   run CMD, timed; on failure explain and exit
#   hash_inputs FILE...     16-hex sha256 over names+contents of FILEs
#   cache_root              where build outputs live (outside the checkout)
#   atomic_install TMP FINAL  move a finished TMP dir to FINAL in one rename
# Progress goes to stderr so a script's stdout stays machine-readable
# (build-kernel prints only the vmlinux path there).

_PODFLARE_T0=${_PODFLARE_T0:-$(date +%s.%N)}

# Seconds since the sourcing script started, one decimal.
elapsed() {
    awk -v a="$_PODFLARE_T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'
}

log() { printf '[+%ss] %s\n' "$(elapsed)" "$*" >&2; }

# step NAME HINT CMD...
# Prints "[+12.3s] NAME ...", runs CMD with its output on stderr, and on failure
# prints "step 'NAME' failed: HINT" and exits with CMD's status. HINT says what to
# check or do; pass "" if there is nothing useful to say.
# CMD runs in a subshell with `set -e` (so a failing line inside a function
# stops it; bash ignores -e in `cmd || ...` contexts), which means it cannot
# set variables for the caller.
step() {
    local name=$1 hint=$2 rc=0 e=0
    shift 2
    log "$name ..."
    [[ $- == *e* ]] && e=1
    set +e
    (set -e; "$@") >&2
    rc=$?
    [ "$e" -eq 1 ] && set -e
    if [ "$rc" -ne 0 ]; then
        printf "[+%ss] step '%s' failed (exit %d)%s\n" "$(elapsed)" "$name" "$rc" \
            "${hint:+: $hint}" >&2
        exit "$rc"
    fi
}

# hash_inputs FILE... : sha256 (first 16 hex) over each file's name and
# contents, in the order given. Renaming or editing an input changes the hash.
hash_inputs() {
    local f
    for f in "$@"; do
        [ -f "$f" ] || { echo "hash_inputs: missing $f" >&2; return 1; }
        printf '%s\0' "$(basename "$f")"
        sha256sum <"$f"
    done | sha256sum | cut -c1-16
}

cache_root() { echo "${PODFLARE_CACHE:-/var/lib/podflare}"; }

# atomic_install TMPDIR FINALDIR: TMPDIR must be fully written and on the same
# filesystem as FINALDIR. A reader sees either nothing or the whole result.
# If FINALDIR already exists (a concurrent build won the race) TMPDIR is dropped.
atomic_install() {
    local tmp=$1 final=$2
    mkdir -p "$(dirname "$final")"
    if mv -T "$tmp" "$final" 2>/dev/null; then
        return 0
    fi
    if [ -d "$final" ]; then
        rm -rf "$tmp"
        return 0
    fi
    echo "atomic_install: cannot move $tmp to $final" >&2
    return 1
}
