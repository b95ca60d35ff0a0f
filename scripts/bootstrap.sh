#!/usr/bin/env bash
# Installs what kemu needs on a Debian machine and creates .venv with kemu in it.
#   scripts/bootstrap.sh          what running guests needs
#   scripts/bootstrap.sh --test   plus what the tests and benchmarks use
#   scripts/bootstrap.sh --distro plus the tools that build the Debian 12 arm64 disk
#                                 image, then builds it into ~/.cache/kemu/distro (once:
#                                 about 15 min; bench/boot_distro.py and
#                                 tests/integration/test_distro_image_aarch64.py use it)
set -euo pipefail
cd "$(dirname "$0")/.."
test_deps=0
distro=0
[ "${1:-}" = "--test" ] && test_deps=1
[ "${1:-}" = "--distro" ] && test_deps=1 && distro=1

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# apt/dpkg-deb unpack the default guest's Debian packages; python3-venv builds .venv;
# gcc, cmake and patch build kemu's TCG engine (scripts/build-unicorn.sh).
pkgs="python3 python3-venv python3-dev gcc cmake patch"
if [ $test_deps = 1 ]; then
  # Peers and tools the tests check kemu against: dtc decompiles the device
  # tree, qemu-img checks images, qemu-system-arm is the benchmark's peer,
  # binutils-aarch64-linux-gnu assembles tiny test guests (gcc-aarch64-linux-gnu
  # compiles the vsock test's guest tool), qemu-system-x86 runs
  # the nested-KVM harness (lz4 unpacks the PVH vmlinux), iasl (acpica-tools)
  # reads back the microvm's ACPI tables.  libvirt-daemon-system and libvirt-clients
  # run kemu as libvirt's emulator (tests/integration/test_libvirt.py starts its own
  # libvirtd); libvirt-dev and pkg-config build the libvirt Python binding in .venv.
  pkgs="$pkgs device-tree-compiler qemu-utils qemu-system-arm qemu-system-x86 binutils-aarch64-linux-gnu gcc-aarch64-linux-gnu cpio linux-libc-dev passt acpica-tools lz4"
  pkgs="$pkgs libvirt-daemon-system libvirt-clients libvirt-dev pkg-config"
  # A browser for the noVNC test (tests/integration/test_novnc_browser.py), npm to fetch
  # noVNC (Debian's package only where no npm is installed: a Node.js from elsewhere
  # brings its own and conflicts with it).
  pkgs="$pkgs chromium"
  command -v npm >/dev/null 2>&1 || pkgs="$pkgs npm"
fi
if [ $distro = 1 ]; then
  # scripts/build-distro-image.py: debootstrap fetches Debian's arm64 packages, proot with
  # qemu-user-static runs their maintainer scripts (no binfmt_misc needed), fdisk (sfdisk),
  # e2fsprogs (mkfs.ext4 -d) and mtools lay out the GPT disk without mounting it;
  # qemu-efi-aarch64 is the EDK2 firmware the image boots through.
  pkgs="$pkgs debootstrap proot qemu-user-static fdisk e2fsprogs mtools qemu-efi-aarch64"
fi
missing=""
for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# A rerun with nothing changed (same pyproject, same engine build, same mode)
# skips pip entirely: it takes about a second.
engine_id=$(cat third_party/unicorn/patches/* scripts/build-unicorn.sh 2>/dev/null | sha256sum | cut -c1-16)
stamp_want="$(sha256sum pyproject.toml | cut -c1-16) $engine_id $test_deps"
stamp=.venv/.kemu-bootstrap
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_want" ] && .venv/bin/python -c 'import kemu, unicorn' 2>/dev/null; then
  if [ $distro = 1 ]; then exec .venv/bin/python scripts/build-distro-image.py; fi
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# kemu's TCG engine: Unicorn 2.1.4 with kemu's patches, built once into a cached
# wheel (1-6 min on 2 cores), installed in place of PyPI's wheel.
wheel=$(PYTHON=.venv/bin/python scripts/build-unicorn.sh)
want=$(basename "$wheel" | cut -d- -f2)
# (no unicorn yet in a fresh .venv: pip show fails, which is not an error here)
have=$(.venv/bin/python -m pip show unicorn 2>/dev/null | awk '/^Version:/{print $2}' || true)
if [ "$have" != "$want" ]; then
  .venv/bin/python -m pip install -q --force-reinstall --no-deps "$wheel"
fi
if [ $test_deps = 1 ]; then
  .venv/bin/python -m pip install -q -e '.[test]'
  .venv/bin/python -c 'import libvirt' || { echo "bootstrap: the venv cannot import libvirt" >&2; exit 1; }
else
  .venv/bin/python -m pip install -q -e .
fi
if [ $test_deps = 1 ]; then
  # noVNC (the browser VNC client the display test runs in Chromium), from the npm registry.
  novnc="${XDG_CACHE_HOME:-$HOME/.cache}/kemu/novnc"
  if [ ! -f "$novnc/node_modules/@novnc/novnc/core/rfb.js" ]; then
    mkdir -p "$novnc" && (cd "$novnc" && npm install --silent --no-audit --no-fund @novnc/novnc@1.7.0 >/dev/null)
  fi
fi
# Byte-compile kemu once, so that start-up does not compile it on every run
# where PYTHONDONTWRITEBYTECODE is set.
.venv/bin/python -m compileall -q src >/dev/null
echo "$stamp_want" > "$stamp"
if [ $distro = 1 ]; then
  .venv/bin/python scripts/build-distro-image.py
fi
