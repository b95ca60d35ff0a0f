#!/usr/bin/env bash
# Builds kemu's TCG engine: the pinned Unicorn sdist from PyPI with the patch
# series in third_party/unicorn/patches, AArch64 only, into a cached wheel.
# Prints the wheel's path.  Unicorn's own test suite for the architecture
# built (test_arm64) runs against the library before the wheel is made.
#
#   scripts/build-unicorn.sh            build (or reuse) the wheel
#   PYTHON=.venv/bin/python scripts/build-unicorn.sh
#
# The wheel's version is 2.1.4+kemu.<id>, where <id> names the patch series
# and these build settings, so a changed series builds a new wheel; it still
# satisfies kemu's pin unicorn==2.1.4 (PEP 440 ignores local versions there).
set -euo pipefail
cd "$(dirname "$0")/.."
top=$(pwd)

VERSION=2.1.4
SDIST_SHA256=00567a70e323f749b419cd86bee4f9115beab7ebba32194581c090cbb7c59cff
ARCHS=aarch64
PYTHON=${PYTHON:-python3}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/kemu/unicorn
patches=("$top"/third_party/unicorn/patches/*.patch)

id=$( { cat "${patches[@]}"; echo "$VERSION $ARCHS"; } | sha256sum | cut -c1-10)
local_version="$VERSION+kemu.$id"
for whl in "$cache"/unicorn-"$local_version"-*.whl; do
  if [ -f "$whl" ]; then echo "$whl"; exit 0; fi
done

mkdir -p "$cache"
work=$(mktemp -d "${TMPDIR:-/tmp}/kemu-unicorn.XXXXXX")
trap 'rm -rf "$work"' EXIT
log="$cache/build-$id.log"
: > "$log"
echo "kemu: building the TCG engine (Unicorn $VERSION + ${#patches[@]} patches, $ARCHS; 1-6 min, log in $log)" >&2

sdist="$cache/unicorn-$VERSION.tar.gz"
if ! echo "$SDIST_SHA256  $sdist" | sha256sum --check --status 2>/dev/null; then
  "$PYTHON" -m pip download -q --no-deps --no-binary :all: "unicorn==$VERSION" -d "$work/dl" >>"$log" 2>&1
  echo "$SDIST_SHA256  $work/dl/unicorn-$VERSION.tar.gz" | sha256sum --check --status \
    || { echo "kemu: unicorn-$VERSION.tar.gz from PyPI does not have the expected SHA-256" >&2; exit 1; }
  mv "$work/dl/unicorn-$VERSION.tar.gz" "$sdist"
fi

tar -xzf "$sdist" -C "$work"
src="$work/unicorn-$VERSION"
for p in "${patches[@]}"; do
  patch -d "$src" -p1 --batch --quiet < "$p" >>"$log" 2>&1 \
    || { echo "kemu: patch $(basename "$p") does not apply to unicorn $VERSION (see $log)" >&2; exit 1; }
done

jobs=$(nproc 2>/dev/null || echo 2)
( cd "$src/src"
  cmake -B build -DCMAKE_BUILD_TYPE=Release -DUNICORN_ARCH="$ARCHS" -DUNICORN_BUILD_TESTS=on -S .
  cmake --build build -j"$jobs"
  cd build && ctest --output-on-failure -R "test_($(echo "$ARCHS" | sed 's/;/|/g' | sed 's/aarch64/arm64/'))"
) >>"$log" 2>&1 || { echo "kemu: the Unicorn build or its tests failed (see $log)" >&2; exit 1; }

mkdir -p "$src/prebuilt"
cp "$src/src/build/libunicorn.so.2" "$src/src/build/libunicorn.a" "$src/prebuilt/"
SETUPTOOLS_SCM_PRETEND_VERSION="$local_version" \
  "$PYTHON" -m pip wheel -q --no-deps -w "$work/wheel" "$src" >>"$log" 2>&1 \
  || { echo "kemu: making the Unicorn wheel failed (see $log)" >&2; exit 1; }
whl=$(ls "$work"/wheel/unicorn-*.whl)
mv "$whl" "$cache/"
echo "$cache/$(basename "$whl")"
