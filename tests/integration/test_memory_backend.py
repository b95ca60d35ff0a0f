"""-machine memory-backend= (issue 13): guest RAM is the -object's memory.  With
memory-backend-file,share=on the guest's writes land in the host file, where
another process sees them; without share=on they stay private to kemu."""

import pytest

READY = rb"kemu guest ready"


@pytest.mark.parametrize("share", ["on", "off"])
def test_guest_ram_is_the_backend_file(guest, console_factory, tmp_path, share):
    ram = tmp_path / "guest.ram"
    marker = f"kemu-memory-backend-{share}-" + "x" * 16
    c = console_factory("run", "-m", "256",
                        "-object", f"memory-backend-file,id=mem0,size=256M,mem-path={ram},"
                                   f"share={share}",
                        "-machine", "virt-7.2,memory-backend=mem0")
    c.expect(READY, 300)
    c.expect(rb"# ", 60)
    # A page of the marker in the guest's page cache (its RAM), built in the guest so
    # that the typed command line does not carry it.
    c.run(f"for i in 1 2 3 4 5 6 7 8; do echo {marker[:10]}''{marker[10:]}; done > /tmp/m")
    c.run("sync")
    assert ram.stat().st_size == 256 << 20
    data = ram.read_bytes()
    assert (marker.encode() in data) == (share == "on")
    c.send("poweroff -f\n")
    assert c.wait(60) == 0
