"""The human monitor (HMP): one command table, several front ends (QMP's
``human-monitor-command``, ``-monitor stdio``, ``-serial mon:stdio``'s Ctrl-A c,
``-monitor unix:PATH,server=on``)."""
