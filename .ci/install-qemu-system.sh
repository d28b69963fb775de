#!/usr/bin/env bash
# Install qemu-system-x86_64 (for the savevm images of tests/wild.rs) from
# bookworm-backports, the suite the installed qemu-utils 10.0.2 comes from. A plain
# `apt-get install qemu-system-x86` would bring bookworm's 7.2 and replace qemu-utils,
# so the suite is pinned with -t and the qemu-img version is checked afterwards.
# Safe to run again: it changes nothing when qemu-system-x86_64 is already there.
set -euo pipefail

want="10.0.2"
list=/etc/apt/sources.list.d/bookworm-backports.list
line="deb http://deb.debian.org/debian bookworm-backports main"

if ! command -v qemu-system-x86_64 >/dev/null; then
    if ! grep -rqsF "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        echo "$line" >"$list"
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86
fi

command -v qemu-system-x86_64 >/dev/null || {
    echo "install-qemu-system: qemu-system-x86_64 is still missing" >&2
    exit 1
}
have=$(qemu-img --version | head -1)
case "$have" in
*"version $want "*) ;;
*)
    echo "install-qemu-system: qemu-img is no longer $want: $have" >&2
    exit 1
    ;;
esac
qemu-system-x86_64 --version | head -1
echo "$have"
