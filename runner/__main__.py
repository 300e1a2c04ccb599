from ._service.cli import main

main()
