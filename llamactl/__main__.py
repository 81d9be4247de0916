from llamactl.cli.main import main

main()
