#!/bin/sh
# Create the virtualenv. Debian splits venv/ensurepip into python3-venv: install it when we
# can (root), otherwise say exactly what is missing.
set -eu
python=$1 venv=$2
[ -x "$venv/bin/python" ] && exit 0
if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    else
        echo "error: $python cannot create virtualenvs; install Debian's python3-venv (sudo apt-get install python3-venv)" >&2
        exit 1
    fi
fi
"$python" -m venv "$venv"
