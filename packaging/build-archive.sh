#!/usr/bin/env bash
# Build the release archive cargo-binstall expects (see [package.metadata.binstall] in
# Cargo.toml): target/archive/qinspect-VERSION-TARGET.tar.gz holding one folder,
# qinspect-VERSION-TARGET/, with the binary, its man page, completions and README.
# With --check, list the archive and fail unless the binary is where binstall looks.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked
bin="${CARGO_TARGET_DIR:-target}/release/qinspect"
version=$("$bin" --version | awk '{print $2}')
target=$(rustc -vV | sed -n 's/^host: //p')
name="qinspect-$version-$target"
stage=target/archive/$name
rm -rf "$stage"
mkdir -p "$stage/completions"
cp "$bin" README.md "$stage/"
"$bin" man > "$stage/qinspect.1"
"$bin" completions bash > "$stage/completions/qinspect.bash"
"$bin" completions zsh > "$stage/completions/_qinspect"
"$bin" completions fish > "$stage/completions/qinspect.fish"
tar -C target/archive -czf "target/archive/$name.tar.gz" "$name"
echo "built target/archive/$name.tar.gz"
[ "${1:-}" = --check ] || exit 0

tar -tzvf "target/archive/$name.tar.gz"
tar -tzf "target/archive/$name.tar.gz" | grep -qx "$name/qinspect"
echo "build-archive.sh: $name.tar.gz has $name/qinspect where cargo-binstall looks"
