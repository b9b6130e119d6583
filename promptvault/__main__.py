"""`python -m promptvault`: the same as the `promptvault` executable."""

from promptvault.entry import main

main()
