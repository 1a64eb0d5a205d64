#!/bin/sh
# From a fresh Debian/Ubuntu machine (as root) to real output in a few minutes: installs what
# is missing, builds loopbpf, and profiles the bundled example app, which blocks its loop.
set -eu
cd "$(dirname "$0")"
./scripts/install-deps.sh
cargo xtask demo
