import gzip
import shutil
import subprocess

import pytest

from kemu.errors import GuestBuildError
from kemu.guest import cpio, kmod




def test_newc_archive_lists_with_cpio(tmp_path, need):
    tool = need("cpio")
    data = cpio.initramfs([cpio.directory("bin"), cpio.file("bin/hello", b"hi\n", 0o755),
                           cpio.symlink("bin/sh", "hello"), cpio.chardev("console", 5, 1)])
    (tmp_path / "a.cpio").write_bytes(gzip.decompress(data))
    out = subprocess.run([tool, "-itv", "-F", str(tmp_path / "a.cpio")], capture_output=True,
                         text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[0].startswith("drwxr-xr-x") and lines[0].endswith("bin")
    assert lines[1].startswith("-rwxr-xr-x") and lines[1].endswith("bin/hello")
    assert lines[2].startswith("lrwxrwxrwx") and "bin/sh -> hello" in lines[2]
    assert lines[3].startswith("crw-------") and "5,   1" in lines[3]
    subprocess.run([tool, "-idm", "-F", str(tmp_path / "a.cpio"), "bin/hello"],
                   cwd=tmp_path, check=True, capture_output=True)
    assert (tmp_path / "bin" / "hello").read_bytes() == b"hi\n"


def build_module(tmp_path, name, depends):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    src = tmp_path / f"{name}.c"
    src.write_text(f'__attribute__((section(".modinfo"), used)) static const char a[] = '
                   f'"license=GPL";\n'
                   f'__attribute__((section(".modinfo"), used)) static const char b[] = '
                   f'"depends={depends}";\n')
    ko = tmp_path / "mods" / f"{name}.ko"
    ko.parent.mkdir(exist_ok=True)
    subprocess.run([gcc, "-c", "-o", str(ko), str(src)], check=True)
    return ko


def test_modinfo_and_dependency_order(tmp_path):
    build_module(tmp_path, "virtio_ring", "")
    build_module(tmp_path, "virtio", "virtio_ring")
    build_module(tmp_path, "virtio_blk", "virtio,virtio_ring")
    info = kmod.modinfo((tmp_path / "mods" / "virtio_blk.ko").read_bytes())
    assert info["depends"] == ["virtio,virtio_ring"] and info["license"] == ["GPL"]
    order = kmod.load_order(tmp_path / "mods", ["virtio-blk", "missing_module"])
    assert [p.name for p in order] == ["virtio_ring.ko", "virtio.ko", "virtio_blk.ko"]


def test_not_an_elf_module():
    with pytest.raises(GuestBuildError):
        kmod.modinfo(b"not an elf at all" * 10)
