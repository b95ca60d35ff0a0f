"""The default guest's cache is trustworthy (issue 16, item 7).

apt itself is replaced by a stand-in that serves the genuine packages from
the shared cache (file:// URLs) with their SHA-256, so these run without
the network; everything else (dpkg-deb, the initramfs, the files) is real.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kemu.errors import GuestBuildError
from kemu.guest import debian

FAKE_BUSYBOX = b"#!/bin/sh\necho I am not busybox\n".ljust(608, b"#")


def genuine_debs() -> list[Path]:
    debs = sorted((Path.home() / ".cache" / "kemu" / "guests" / "aarch64" / "debs")
                  .glob("*.deb"))
    if len(debs) != 2 or shutil.which("dpkg-deb") is None:
        pytest.skip("needs the default aarch64 guest's packages in ~/.cache/kemu "
                    "(kemu guest build) and dpkg-deb")
    return debs


FAKE_APT = '''
class FakeApt:
    """apt as far as build_guest uses it, over the genuine packages."""
    DEBS = {debs!r}
    def __init__(self, arch, state):
        pass
    def update(self):
        pass
    def depends(self, package):
        return [Path(d).name.split("_")[0] for d in self.DEBS if "linux-image" in d]
    def uris(self, packages):
        return [(Path(d).as_uri(), Path(d).name, Path(d).stat().st_size,
                 hashlib.sha256(Path(d).read_bytes()).hexdigest()) for d in self.DEBS]
'''


def fake_apt(debs: list[Path]):
    scope = {"Path": Path, "hashlib": hashlib}
    exec(FAKE_APT.format(debs=[str(d) for d in debs]), scope)
    return scope["FakeApt"]


def test_a_tampered_cached_package_is_not_used(tmp_path, monkeypatch):
    debs = genuine_debs()
    busybox_deb = next(d for d in debs if d.name.startswith("busybox"))
    cache = tmp_path / "kemu" / "guests" / "aarch64" / "debs"
    cache.mkdir(parents=True)
    # A well-formed .deb under the genuine name, whose /bin/busybox is 608 bytes of script.
    pkg = tmp_path / "fake"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "bin").mkdir()
    (pkg / "bin" / "busybox").write_bytes(FAKE_BUSYBOX)
    (pkg / "DEBIAN" / "control").write_text(
        "Package: busybox-static\nVersion: 1\nArchitecture: arm64\n"
        "Maintainer: x <x@example.org>\nDescription: fake\n")
    subprocess.run(["dpkg-deb", "--build", str(pkg), str(cache / busybox_deb.name)],
                   check=True, capture_output=True)
    shutil.copy(next(d for d in debs if d != busybox_deb), cache)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(debian, "Apt", fake_apt(debs))
    image = debian.build_guest("aarch64", show_progress=False)
    initrd = gzip.decompress(image.initrd.read_bytes())
    assert b"I am not busybox" not in initrd
    assert (cache / busybox_deb.name).read_bytes() == busybox_deb.read_bytes()


def test_a_package_without_a_sha256_is_refused(tmp_path, monkeypatch):
    if shutil.which("apt-get") is None:
        pytest.skip("needs apt-get")
    apt = debian.Apt("arm64", tmp_path)
    line = ("'http://deb.debian.org/debian/pool/main/b/busybox/busybox-static_1.35_arm64.deb'"
            " busybox-static_1.35_arm64.deb 822236 \n")
    monkeypatch.setattr(apt, "_run", lambda *args: line)
    with pytest.raises(GuestBuildError, match="no SHA-256"):
        apt.uris(["busybox-static"])
    monkeypatch.setattr(apt, "_run", lambda *args: line.replace(" \n", " MD5Sum:abc\n"))
    with pytest.raises(GuestBuildError, match="no SHA-256"):
        apt.uris(["busybox-static"])


def test_an_interrupted_build_leaves_the_previous_guest_whole(tmp_path):
    """A rebuild that fails half-way through writing the kernel (here: the file size
    limit, as a full disk would) leaves the guest that was there as it was."""
    debs = genuine_debs()
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    script = textwrap.dedent(f'''
        import hashlib, resource, sys
        from pathlib import Path
        from kemu.guest import debian
        {textwrap.indent(FAKE_APT.format(debs=[str(d) for d in debs]), "        ").strip()}
        debian.Apt = FakeApt
        unpack = debian.unpack_kernel

        def unpack_then_limit(*args):
            # Packages unpacked (dpkg-deb writes the 27 MiB kernel); from here on
            # no file of this process may pass 8 MiB.
            result = unpack(*args)
            if sys.argv[1] == "limit":
                resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))
            return result
        debian.unpack_kernel = unpack_then_limit
        try:
            debian.build_guest("aarch64", show_progress=False)
        except Exception as e:
            print(type(e).__name__, e)
            sys.exit(3)
    ''')
    first = subprocess.run([sys.executable, "-c", script, "free"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    guest_dir = tmp_path / "kemu" / "guests" / "aarch64"
    manifest = json.loads((guest_dir / debian.manifest_path("aarch64").name).read_text())
    before = {p: hashlib.sha256(Path(p).read_bytes()).hexdigest()
              for p in (manifest["kernel"], manifest["initrd"])}
    second = subprocess.run([sys.executable, "-c", script, "limit"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 3, second.stdout + second.stderr
    assert json.loads((guest_dir / debian.manifest_path("aarch64").name).read_text()) == manifest
    after = {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in before}
    assert after == before
    assert not [p.name for p in guest_dir.iterdir() if p.name.startswith(".")]


class NoApt:
    """apt that must not be asked: the cache is complete."""

    def __init__(self, arch, state):
        raise AssertionError("apt was asked although the cache is complete")


def test_guest_build_reuses_a_complete_cache_and_rebuilds_an_incomplete_one(
        tmp_path, monkeypatch, capsys):
    from kemu import cli

    debs = genuine_debs()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(debian, "Apt", fake_apt(debs))
    assert cli.main(["guest", "build"]) == 0
    first = capsys.readouterr()
    assert "reusing" not in first.err
    guest_dir = tmp_path / "kemu" / "guests" / "aarch64"
    manifest = (guest_dir / debian.manifest_path("aarch64").name).read_text()

    # Another kemu version sharing the cache builds its own guest beside this one.
    with monkeypatch.context() as other:
        other.setattr(debian, "recipe_id", lambda: "another0kemu")
        assert debian.cached_guest("aarch64") is None
        debian.build_guest("aarch64", show_progress=False)
        assert debian.cached_guest("aarch64") is not None

    monkeypatch.setattr(debian, "Apt", NoApt)
    assert cli.main(["guest", "build"]) == 0
    again = capsys.readouterr()
    assert again.out == first.out
    assert "kemu: reusing the complete cached guest" in again.err
    assert (guest_dir / debian.manifest_path("aarch64").name).read_text() == manifest
    assert debian.default_guest("aarch64", show_progress=False).initrd == \
        Path(json.loads(manifest)["initrd"])

    # Anything altered is rebuilt: a package apt's hash no longer matches, the
    # initramfs; and everything on request.
    monkeypatch.setattr(debian, "Apt", fake_apt(debs))
    for spoiled, args in ((guest_dir / "debs" / debs[0].name, []),
                          (guest_dir / f"initramfs-{debian.recipe_id()}.cpio.gz", []),
                          (None, ["--rebuild"])):
        if spoiled is not None:
            spoiled.write_bytes(b"junk")
            assert debian.cached_guest("aarch64", check_packages=True) is None
        assert cli.main(["guest", "build", *args]) == 0
        assert "reusing" not in capsys.readouterr().err
        assert debian.cached_guest("aarch64", check_packages=True) is not None
