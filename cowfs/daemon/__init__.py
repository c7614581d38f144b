"""The daemon: the process that serves a store (cowfs.daemon.process forks it, .server is
its work), its configuration (.config, the -o table in .options), the admin socket (.admin),
systemd's notify protocol (.notify) and the kernel's mount table (.mounts).

Importing the package costs nothing: the CLI reads the mount table and talks to the admin
socket without pyfuse3, trio or the database (cowfs.daemon.server imports those)."""
