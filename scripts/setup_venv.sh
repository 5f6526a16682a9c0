# Sourced by scripts/test.sh and scripts/demo.sh: create or reuse the virtual environment and install the
# project with the pinned versions of constraints.txt (the versions the suite was last run with), quietly.
# pip's own output goes to $VENV/setup.log and is shown only when the install fails.
# Usage: source scripts/setup_venv.sh EXTRA   (EXTRA: the pyproject extra to install, e.g. "test")

fastwan_setup_venv() {
    local extra="$1"
    VENV="${FASTWAN_VENV:-.venv}"
    local log="$VENV/setup.log"
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV" || { echo "setup: could not create the virtual environment $VENV (is python3-venv installed?)" >&2; return 1; }
    fi
    # shellcheck disable=SC1091
    . "$VENV/bin/activate"
    # The install is redone only when what it depends on changed (pyproject, constraints, the extra).
    local stamp="$VENV/.fastwan-installed-$extra"
    local want
    want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    echo "setup: installing into $VENV (pinned versions from constraints.txt; pip's log: $log)"
    {
        python -m pip install --upgrade pip
        # torch first and pinned: an unpinned `torch` would pull a multi-GB CUDA build.
        python -m pip install -c constraints.txt torch
        python -m pip install -c constraints.txt -e ".[$extra]"
    } > "$log" 2>&1 || {
        tail -n 30 "$log" >&2
        echo "setup: pip failed (full log: $log)" >&2
        return 1
    }
    echo "$want" > "$stamp"
}

# pytest in the active environment; its exit 5 (nothing collected, e.g. a filter matched no test) is
# not a failure of the code.
fastwan_pytest() {
    local status=0
    python -m pytest -q "$@" || status=$?
    [ "$status" -eq 5 ] && return 0
    return "$status"
}
