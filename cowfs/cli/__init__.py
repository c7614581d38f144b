"""The `cowfs` command line, one module per concern:

    main         the click group, init/mount/umount, and the registration of every command
    control      snapshot, branch, rollback, clone, delete, list, diff (the control file)
    maintenance  stats, gc, dedup, fsck (daemon when mounted, else offline)
    status       status                      history    log (the graph renderer)
    run          run                         transfer   import, export (over cowfs.treecopy)
    help         help topics and the man page, from the commands' own --help
    targets      what a path names: a place in a mount, or a store directory
    admin        talking to daemons (control file, admin socket), refusals that say who may
    tempmount    a branch mounted for the length of one command
    params       shared arguments and options, shell completion
    errors       CliError, exit statuses, one line for whatever escapes
    report, textfmt, progress   human output: formats, units and quoting, progress bars

`cowfs.cli:main` is the console script's entry point (pyproject.toml; scripts installed
before this package existed import it from here too), so the name `main` of this package
is the click group, not the module cowfs.cli.main.
"""
from cowfs.cli.main import main

__all__ = ["main"]
