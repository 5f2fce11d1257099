from gputel.cli.main import main

main()
