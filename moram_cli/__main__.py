from moram_cli.entry import main

main()
