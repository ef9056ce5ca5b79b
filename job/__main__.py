"""`python -m job <command>`."""

from job.cli import main

main()
