"""`python -m service ...` is the `kvserve` command."""
from service.cli import main

main()
