from moram_cli.cli import main

main()
