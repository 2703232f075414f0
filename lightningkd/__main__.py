from lightningkd.cli import main

main()
