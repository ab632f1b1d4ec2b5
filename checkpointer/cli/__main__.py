from checkpointer.cli.commands import main

main()
