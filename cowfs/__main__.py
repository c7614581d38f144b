from cowfs.cli import main

main()
