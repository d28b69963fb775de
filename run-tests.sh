#!/usr/bin/env bash
# The test command: installs what the tests need when it is missing, builds and
# checks the .deb, then runs the test suite. Extra arguments go to `cargo test`;
# `--setup-only` installs what is missing and stops; `--build-deps` installs only
# what building qinspect needs (libzstd-dev, pkg-config) and stops.
#
#   qemu-img, qemu-io  qemu-utils 10.0.2 (on Debian bookworm: from bookworm-backports)
#   qemu-system-x86_64 qemu-system-x86 10.0.2, same suite (tests make savevm images)
#   tmux               for tests/tui_tmux.rs
#   cargo-deb          for the .deb build (from crates.io)
#   libzstd-dev, pkg-config  to build: qinspect links the system's libzstd, the
#                      one QEMU links, to compute zstd-compressed cluster sizes
#
# qinspect needs none of the others at run time: QEMU is only the tests' oracle.
set -euo pipefail
cd "$(dirname "$0")"

setup_only=
build_deps_only=
if [ "${1:-}" = --build-deps ]; then
    build_deps_only=1
    shift
fi
if [ "${1:-}" = --setup-only ]; then
    setup_only=1
    shift
fi

QEMU_VERSION=10.0.2
CARGO_DEB_VERSION=3.8.0

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

qemu_ok() {
    command -v qemu-img >/dev/null && command -v qemu-io >/dev/null &&
        qemu-img --version | head -1 | grep -q "version $QEMU_VERSION "
}

apt_updated=
apt_update() {
    if [ -z "$apt_updated" ]; then
        as_root apt-get update -qq
        apt_updated=1
    fi
}

install_qemu() {
    # Debian's qemu-utils $QEMU_VERSION: bookworm has it in bookworm-backports.
    . /etc/os-release
    local suite=
    [ "${VERSION_CODENAME:-}" = bookworm ] && suite=bookworm-backports
    if [ -n "$suite" ] &&
        ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        # Same mirror as the machine's own Debian source.
        local uri
        uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
        uri=${uri:-http://deb.debian.org/debian}
        echo "adding bookworm-backports ($uri) to /etc/apt/sources.list.d/"
        printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$uri" | as_root tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null
        apt_updated=
    fi
    apt_update
    local version
    version=$(apt-cache madison qemu-utils | awk -v v="$QEMU_VERSION" \
        '{ if (index($3, ":" v "+") || index($3, v "+") == 1) { print $3; exit } }')
    if [ -z "$version" ]; then
        echo "run-tests.sh: no qemu-utils $QEMU_VERSION in the apt sources" >&2
        apt-cache madison qemu-utils >&2 || true
        exit 1
    fi
    echo "installing qemu-utils=$version"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --allow-downgrades \
        ${suite:+-t "$suite"} "qemu-utils=$version"
}

if ! pkg-config --exists libzstd 2>/dev/null; then
    apt_update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libzstd-dev pkg-config
fi
[ -n "$build_deps_only" ] && exit 0
if ! qemu_ok; then
    install_qemu
fi
# qemu-system-x86_64 (savevm images with VM state), from the same suite as
# qemu-utils, keeping qemu-img at $QEMU_VERSION.
if ! command -v qemu-system-x86_64 >/dev/null; then
    as_root .ci/install-qemu-system.sh
fi
if ! command -v tmux >/dev/null; then
    apt_update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux
fi
if ! qemu_ok; then
    echo "run-tests.sh: the tests need qemu-img $QEMU_VERSION; found: $(qemu-img --version | head -1)" >&2
    exit 1
fi
qemu-img --version | head -1
tmux -V
if ! command -v cargo >/dev/null; then
    echo "run-tests.sh: cargo is missing: install the Rust toolchain (rustup) first" >&2
    [ -n "$setup_only" ] && exit 0
    exit 1
fi
if ! cargo deb --version >/dev/null 2>&1; then
    cargo install --locked cargo-deb --version "$CARGO_DEB_VERSION"
fi
cargo deb --version
[ -n "$setup_only" ] && exit 0

# The .deb: binary, man page and completions where Debian puts them.
packaging/build-deb.sh --check
# The release archive cargo-binstall reads.
packaging/build-archive.sh --check

cargo test --release --locked "$@" -- --show-output
